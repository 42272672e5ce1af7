"""CUDA checks (marker `gpu`; `make test-all` on a machine with a GPU): bf16 merges and the bench path."""

from __future__ import annotations

import pytest
import torch

import skipvlm
from skipvlm.bench import run_bench

from conftest import build_eas, logits, make_inputs, randomize_adapters

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_static_merge_on_cuda_matches_forced_means():
    model = randomize_adapters(build_eas("llava", dtype=torch.bfloat16), std=0.05).to("cuda")
    batch = {k: v.to("cuda") for k, v in make_inputs("llava", lengths=(7, 4), dtype=torch.bfloat16).items()}
    model.calibrate([batch], progress=False)
    model.adapters.use_calibration = True
    forced = logits(model, batch).float()
    merged = model.merge_and_unload("static")
    got = logits(merged, batch).float()
    assert (got - forced).abs().max() < 0.1 * forced.abs().max()


def test_bench_reports_peak_memory_on_cuda():
    model = skipvlm.presets.build("llama-cpu", device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 8000, (1, 64), device="cuda")
    rows = run_bench(
        model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0, 6], ["stock", "eas"], 4, 2
    )
    assert all(r["peak_memory_bytes"] > r["weight_bytes"] * 0.5 for r in rows)


@pytest.mark.parametrize("plan", [skipvlm.Plan(visual_exit_layer=2), skipvlm.Plan(fastv_layer=2)])
def test_bf16_token_exit_on_cuda_tracks_fp32_and_batches(plan):
    from conftest import build_model

    batch = make_inputs("qwen2_vl", lengths=(7, 4))
    ref = logits(skipvlm.apply_plan(build_model("qwen2_vl"), plan), batch)
    model = skipvlm.apply_plan(build_model("qwen2_vl", dtype=torch.bfloat16).to("cuda"), plan)
    cuda = {k: v.to("cuda") for k, v in make_inputs("qwen2_vl", lengths=(7, 4), dtype=torch.bfloat16).items()}
    got = logits(model, cuda).float().cpu()
    assert (got[:, -1] - ref[:, -1]).abs().max() < 0.05 * ref.abs().max() + 0.05
    with torch.no_grad():
        out = model.generate(**cuda, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == cuda["input_ids"].shape[1] + 4
