"""Presets of real shapes, `skipvlm cost`, and `skipvlm bench` with its roofline columns."""

from __future__ import annotations

import json

import pytest
import torch

import skipvlm
from skipvlm import presets
from skipvlm.bench import bench_table, run_bench, skip_layers
from skipvlm.cli import main
from skipvlm.cost import count_macs, decode_bytes

from conftest import build_model, make_inputs


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llava-1.5-7b", 7.06),
        ("lavin-7b", 7.06),  # LLaMA-7B 6.74 + CLIP ViT-L/14 0.30 + the projector
        ("llava-1.5-13b", 13.35),
        ("llama-2-7b", 6.74),
        ("qwen2-vl-2b", 2.21),
        ("qwen2-vl-7b", 8.29),
        ("qwen3-vl-8b", 8.77),
    ],
)
def test_presets_have_the_published_sizes_on_the_meta_device(name, billions):
    model = presets.build(name)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.02)
    assert skipvlm.arch_facts(model).num_layers in (28, 32, 36, 40)


def test_qwen3_vl_vision_macs_are_its_tower_weights_times_the_tokens_they_see():
    """Qwen3-VL's rule, rederived from the module tree: every linear weight of the blocks per patch, of
    the merger and the three DeepStack mergers per merged token (4 patches), the patch embedding per
    patch, plus the 2 N^2 e score / value terms of each full-attention block."""

    def linear(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    model = presets.build("qwen3-vl-8b")
    tower, patches = model.model.visual, 1024
    mergers = linear(tower.merger) + linear(tower.deepstack_merger_list)
    assert len(tower.deepstack_merger_list) == 3
    e = tower.config.hidden_size
    expected = (
        patches * (linear(tower.blocks) + tower.patch_embed.proj.weight.numel())
        + patches // 4 * mergers
        + len(tower.blocks) * 2 * patches * patches * e
    )
    report = count_macs(model, 600, image_patches=patches)
    assert (report.vision, report.projector, report.visual_tokens) == (expected, 0, 256)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"llava-1\.5-7b"):
        presets.get("llava-2")


@pytest.mark.parametrize("k, paper_share", [(8, 8.0), (12, 12.0)])
def test_cost_cli_paper_convention_reproduces_the_eas_paper_shares(capsys, tmp_path, k, paper_share):
    out = tmp_path / "cost.json"
    args = ["cost", "--preset", "llava-1.5-7b", "--prompt-tokens", "749", "--skip-attention-count", str(k)]
    assert main([*args, "--convention", "paper", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    share = 100 * data["removed_share"]
    assert abs(share - paper_share) <= 0.1 and f"{share:.1f}%" in text
    assert data["convention"] == "paper" and data["stock"]["convention"] == "paper"
    # the paper's fvcore-style count: 4 C^2 N per MHA of LLaMA-7B, about 50 GMACs at 749 tokens
    removed = data["stock"]["total"] - data["plan"]["total"]
    assert removed == k * 4 * 4096**2 * 749
    # the default prints the table in the full convention and the removed share in both
    assert main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    both = json.loads(out.read_text())["removed_share_by_convention"]
    assert abs(100 * both["paper"] - paper_share) <= 0.1 and 100 * both["full"] > 100 * both["paper"] + 0.3
    assert "'full' convention" in text and "'paper' convention" in text
    assert f"{100 * both['full']:.1f}%" in text and f"{100 * both['paper']:.1f}%" in text


def test_paper_convention_drops_exactly_the_n_squared_terms():
    model = presets.build("llava-1.5-7b", device="meta")
    full, paper = (count_macs(model, 749, convention=c) for c in ("full", "paper"))
    c, n, layers = 4096, 749, 32
    assert full.attention - paper.attention == layers * 2 * n * n * c
    vision = model.config.vision_config  # 577 tokens (576 patches + the class token) in each tower layer
    assert full.vision - paper.vision == vision.num_hidden_layers * 2 * 577**2 * vision.hidden_size
    assert (full.mlp, full.projector, full.lm_head) == (paper.mlp, paper.projector, paper.lm_head)
    with pytest.raises(ValueError, match="convention must be one of"):
        count_macs(model, 749, convention="fvcore")


def test_cost_cli_refuses_more_skips_than_attentions(capsys):
    assert main(["cost", "--preset", "llava-1.5-7b", "--skip-attention-count", "40"]) == 2
    assert "--skip-attention-count 40: the model has only 32 attentions" in capsys.readouterr().err


def test_cost_cli_skip_attention_lists_layers_and_a_count_has_its_own_option(tmp_path, capsys):
    def share(*skip: str) -> float:
        out = tmp_path / "cost.json"
        args = ["cost", "--preset", "llava-1.5-7b", "--prompt-tokens", "749", *skip, "--out", str(out)]
        assert main(args) == 0
        return json.loads(out.read_text())["removed_share"]

    odd = ",".join(str(i) for i in range(1, 24, 2))  # the 12 layers of the benchmark's pattern
    assert share("--skip-attention", odd) == share("--skip-attention-count", "12")
    assert share("--skip-attention", "12") == pytest.approx(share("--skip-attention-count", "12") / 12)
    capsys.readouterr()
    assert main(["cost", "--preset", "llava-1.5-7b", "--skip-attention", "3,40"]) == 2
    err = capsys.readouterr().err
    assert "--skip-attention 3,40: the model has 32 decoder layers, so there is no layer 40" in err
    assert "pass --skip-attention-count N instead" in err
    with pytest.raises(SystemExit):  # one or the other
        main(["cost", "--preset", "llava-1.5-7b", "--skip-attention", "3", "--skip-attention-count", "2"])
    assert "not allowed with argument --skip-attention" in capsys.readouterr().err


def test_decode_bytes_drop_by_the_skipped_weights_and_cache():
    model = build_model("llama")
    attn = sum(p.numel() * 4 for p in model.model.layers[1].self_attn.parameters())
    kv = 2 * 2 * 8 * 4 * 10  # k and v, 2 kv heads x head_dim 8, fp32, 10 tokens
    full, skipped = (
        decode_bytes(model, context_tokens=10),
        decode_bytes(model, skipvlm.Plan(skip_attention=[1]), 10),
    )
    assert full - skipped == attn + kv


def test_skip_pattern():
    assert skip_layers(12, 6) == [1, 3, 5, 7, 9, 11]
    assert skip_layers(8, 6) == [1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError):
        skip_layers(4, 5)


def test_run_bench_compares_every_method_with_bounds():
    model = build_model("llama")
    rows = run_bench(
        model, make_inputs("llama", lengths=(12,)), [0, 2], ["stock", "lora", "pia", "eas", "skip"], 4, 2
    )
    names = [r["name"] for r in rows]
    assert names == [
        "stock",
        "lora (unmerged)",
        "pia (unmerged)",
        "eas k=0 (merged)",
        "skip k=2",
        "eas k=2 (merged)",
    ]
    by = {r["name"]: r for r in rows}
    assert by["stock"]["prefill_bound"] == by["stock"]["decode_bound"] == 1.0
    assert by["lora (unmerged)"]["prefill_bound"] < 1.0 and by["pia (unmerged)"]["decode_bound"] < 1.0
    assert (
        by["eas k=2 (merged)"]["decode_bound"] > 1.0
        and by["eas k=2 (merged)"]["kv_cache_bytes"] * 2 == by["stock"]["kv_cache_bytes"]
    )
    assert by["eas k=2 (merged)"]["skipped_attentions"] == 2
    assert (
        by["eas k=2 (merged)"]["weight_bytes"]
        < by["stock"]["weight_bytes"]
        < by["lora (unmerged)"]["weight_bytes"]
    )
    assert by["stock"]["peak_memory_bytes"] is None and by["stock"]["generate_ms"] > 0  # CPU: no peak memory
    assert "bound" in bench_table(rows)
    assert skipvlm.current_plan(model) == skipvlm.Plan()  # the stock model is left alone


def test_bench_cli_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "llama-cpu", "--prompt-tokens", "16", "--new-tokens", "3", "--repeats", "1"]
    args += ["--skip-attention-counts", "0,2", "--methods", "stock,eas", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["stock", "eas k=0 (merged)", "eas k=2 (merged)"]
    assert data["meta"]["torch"] == torch.__version__ and out.with_suffix(".png").is_file()
    assert "decode ms/tok" in capsys.readouterr().out


def test_bench_cli_takes_counts_not_layers(capsys):
    args = ["bench", "--preset", "llama-cpu", "--device", "cpu"]
    for wrong in ("--skip-attention", "--skip"):
        with pytest.raises(SystemExit):
            main([*args, wrong, "1,3"])
        assert (
            f"{wrong} is not an option of this command; pass --skip-attention-counts"
            in capsys.readouterr().err
        )
    assert main([*args, "--skip-attention-counts", "0,13"]) == 2
    assert "--skip-attention-counts 13: the model has only 12 attentions" in capsys.readouterr().err


def test_bench_cli_times_a_local_llava_checkpoint_with_an_image(toy_dir, tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--model",
        str(toy_dir / "model"),
        "--prompt-tokens",
        "24",
        "--new-tokens",
        "3",
        "--repeats",
        "1",
    ]
    args += ["--skip-attention-counts", "0,2", "--methods", "stock,eas", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[2]["name"] == "eas k=2 (merged)" and rows[2]["prefill_bound"] > 1.0


@pytest.mark.parametrize(
    ("name", "parameters", "layers"),
    [("gemma-3-4b", 4_300_079_472, 34), ("gemma-3-12b", 12_187_325_040, 48)],  # the published counts
)
def test_gemma3_presets_have_the_published_sizes_and_layer_pattern(name, parameters, layers):
    model = presets.build(name)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == parameters
    facts = skipvlm.arch_facts(model)
    assert facts.num_layers == layers
    assert [i for i, t in enumerate(facts.layer_types) if t == "full_attention"] == list(range(5, layers, 6))


def test_cost_cli_counts_a_gemma3_preset(tmp_path, capsys):
    out = tmp_path / "cost.json"
    args = ["cost", "--preset", "gemma-3-4b", "--prompt-tokens", "300", "--skip-attention-count", "8"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert 0 < report["removed_share"] < 0.1


def test_sliding_layers_of_gemma3_count_attention_over_their_window_only():
    from skipvlm.cost import count_macs

    config = presets.get("gemma-3-4b")
    facts = skipvlm.arch_facts(config)
    c_q = facts.num_attention_heads * facts.head_dim
    layers = count_macs(config, prompt_tokens=2048).layers
    assert layers[0]["attention_sdp"] == 2 * 2048 * 1024 * c_q  # local: a 1024-token window
    assert layers[5]["attention_sdp"] == 2 * 2048 * 2048 * c_q  # global


# --- serving: batches, compiled decoding, token exit, LaVIN ------------------------------------------------


def test_bench_inputs_are_left_padded_with_the_image_at_another_place_in_each_row():
    from skipvlm.arch import arch_facts
    from skipvlm.cli.measure import _bench_inputs

    model = presets.build("llava-cpu-tiny", device="cpu")
    facts = arch_facts(model)
    inputs = _bench_inputs(model, facts, 40, "cpu", batch=4)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == (4, 40) and inputs["pixel_values"].shape[0] == 4
    pads = (mask == 0).sum(1).tolist()
    assert pads == sorted(pads) and pads[0] == 0 and len(set(pads)) == 4  # left padding, all different
    image = ids == facts.image_token_id
    assert image.sum(1).tolist() == [16] * 4
    starts = image.int().argmax(1) - torch.tensor(pads)
    assert starts.tolist() == [1, 2, 3, 4]  # a different place after each row's own start
    one = _bench_inputs(model, facts, 40, "cpu")
    assert bool(one["attention_mask"].all()) and int(one["input_ids"][0, 1]) == facts.image_token_id
    with pytest.raises(ValueError, match="raise --prompt-tokens"):
        _bench_inputs(model, facts, 18, "cpu", batch=4)


def test_decode_step_bytes_read_the_weights_once_and_every_sequences_cache():
    from skipvlm.bench import decode_step_bytes

    model = presets.build("llava-cpu-tiny", device="meta")
    weights, one = decode_step_bytes(model, skipvlm.Plan(), 0), decode_step_bytes(model, skipvlm.Plan(), 30)
    assert decode_step_bytes(model, skipvlm.Plan(), 30, batch=8) - weights == 8 * (one - weights)
    vtw = skipvlm.Plan(visual_exit_layer=4)  # layers 4..7 of 8 keep the 14 text tokens of 30
    kv = one - weights
    assert (
        abs(decode_step_bytes(model, vtw, 30, visual_tokens=16) - weights - kv * (4 * 30 + 4 * 14) / 240) <= 1
    )


@pytest.mark.slow  # the GPU suite's dry run (tests/test_gpu_suite.py) runs these rows in the default suite
def test_run_bench_rows_per_batch_and_mode_with_token_exit_lavin_and_static_cache():
    from skipvlm.arch import arch_facts
    from skipvlm.bench import TokenExitRows
    from skipvlm.cli.measure import _bench_inputs

    model = presets.build("llava-cpu-tiny", device="cpu")
    facts = arch_facts(model)
    batches = {b: _bench_inputs(model, facts, 30, "cpu", b) for b in (1, 2)}
    rows = run_bench(
        model,
        batches[1],
        [4],
        ["stock", "lavin", "eas", "vtw", "eas+vtw"],
        new_tokens=2,
        repeats=1,
        batches=batches,
        modes=("eager", "compiled"),
        exits=TokenExitRows(vtw_layer=4),
        backend="eager",  # tracing only: the compiled path without a C++ build
    )
    by = {(r["name"], r["batch_size"], r["mode"]): r for r in rows}
    names = ["stock", "lavin (unmerged)", "vtw K=4", "eas k=4 (merged)", "eas k=4 + vtw K=4"]
    for b in (1, 2):
        assert [n for n, bb, m in by if bb == b and m == "eager"] == names
        assert [n for n, bb, m in by if bb == b and m == "compiled"] == [
            "stock",
            "lavin (unmerged)",
            "eas k=4 (merged)",
        ]
    eas, stock = by["eas k=4 (merged)", 2, "compiled"], by["stock", 2, "compiled"]
    assert eas["cache"] == "static" and eas["kv_cache_bytes"] * 2 == stock["kv_cache_bytes"]  # 4 of 8 kept
    # layers x (K, V) x B x (30 + 2 - 1: the last token is never cached) x C x fp32
    assert stock["kv_cache_bytes"] == 8 * 2 * 2 * 31 * 64 * 4
    assert eas["batch_tokens_per_s"] == 2 * eas["decode_tokens_per_s"]
    assert eas["compile_speedup"] > 0 and by["eas k=4 (merged)", 2, "eager"]["compile_speedup"] is None
    assert (
        by["vtw K=4", 1, "eager"]["prefill_bound"] > 1.0 and by["vtw K=4", 1, "eager"]["decode_bound"] > 1.0
    )
    assert by["lavin (unmerged)", 1, "eager"]["decode_bound"] < 1.0  # the adapter branch is read too
    assert by["eas k=4 (merged)", 1, "eager"]["speedup_kept_vs_batch1"] == 1.0
    assert "compiled" in bench_table(rows)


def test_bench_cli_json_holds_batch_8_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "llama-cpu", "--prompt-tokens", "16", "--new-tokens", "3", "--repeats", "1"]
    args += [
        "--skip-attention-counts",
        "6",
        "--methods",
        "stock,eas",
        "--device",
        "cpu",
        "--batch-size",
        "1,8",
    ]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["name"], r["batch_size"]) for r in data["rows"]] == [
        ("stock", 1),
        ("eas k=6 (merged)", 1),
        ("stock", 8),
        ("eas k=6 (merged)", 8),
    ]
    assert "eas k=6 (merged) B=8 eager: speedup kept vs batch 1" in data["summary"]
    assert "keeps" in capsys.readouterr().out


def _exit_code(argv: list[str]) -> int:
    """``main``'s return code, or the code argparse exits with."""
    try:
        return main(argv)
    except SystemExit as done:
        return int(done.code)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "1,0"], "batch sizes must be 1 or more"),
        (["--repeats", "0"], "--repeats: expected a positive integer"),
        (["--threads", "-1"], "--threads: expected a count"),
        (["--prompt-tokens", "0"], "--prompt-tokens: expected a positive integer"),
        (["--compile", "--compile-backend", "nope"], "'nope' is not a torch.compile backend; choose from"),
        (["--methods", ","], "--methods ',' names no method; pass e.g. --methods stock,eas"),
    ],
)
def test_bench_cli_refuses_bad_numbers_and_backends_before_timing(capsys, extra, message):
    # each was a torch error deep in the run (or, for the backend, after the eager rows were timed)
    args = ["bench", "--preset", "llava-cpu-tiny", "--device", "cpu", "--new-tokens", "2", "--repeats", "1"]
    assert _exit_code([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "timing" not in err


def test_cost_cli_refuses_a_negative_image_count(capsys):
    assert _exit_code(["cost", "--preset", "llava-cpu-tiny", "--images", "-1"]) == 2
    assert "--images: expected a count (0 or more), got -1" in capsys.readouterr().err


def test_bench_cli_keeps_the_rows_timed_before_a_failure(tmp_path, capsys, monkeypatch):
    # a GPU run that fails at batch 8 (out of memory, a compiler error) must not lose batch 1
    from skipvlm.bench import compare

    real = compare.measure_models

    def fails_at_batch_2(models, inputs, *args, **kwargs):
        if inputs["input_ids"].shape[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(models, inputs, *args, **kwargs)

    monkeypatch.setattr(compare, "measure_models", fails_at_batch_2)
    out = tmp_path / "bench.json"
    args = ["bench", "--preset", "llama-cpu", "--prompt-tokens", "16", "--new-tokens", "2", "--repeats", "1"]
    args += ["--methods", "stock", "--skip-attention-counts", "0", "--device", "cpu", "--batch-size", "1,2"]
    assert main([*args, "--out", str(out)]) == 2  # the error is reported as every CLI error is
    data = json.loads(out.read_text())
    assert data["partial"] is True and "CUDA out of memory (simulated)" in data["error"]
    assert [(r["name"], r["batch_size"]) for r in data["rows"]] == [("stock", 1)]
    assert "(partial)" in capsys.readouterr().out
