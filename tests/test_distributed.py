"""Two processes under torchrun (gloo, CPU): the same subsets, the same preferences, the same adapters;
only rank 0 writes; data-parallel training equals one process accumulating the same batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import skipvlm
from dist_search import data


def launch(launcher: list[str], tmp_path: Path, env: dict | None = None) -> tuple[Path, list[dict]]:
    """Run dist_search.py on two processes under ``launcher``; (its output folder, each rank's report)."""
    script = Path(__file__).with_name("dist_search.py")
    out, reports = tmp_path / "out", tmp_path / "reports"
    reports.mkdir()
    env = {**os.environ, **(env or {}), "REPORT_DIR": str(reports)}
    done = subprocess.run(
        [*launcher, str(script), str(out)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_ranks_agree_and_only_rank_0_writes(out: Path, ranks: list[dict]) -> None:
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["updates"] == 8  # 32 batches / 2 ranks = 4 steps per epoch x 2 search epochs
    assert ranks[0]["preferences"] == ranks[1]["preferences"]
    assert any(p != 0 for p in ranks[0]["preferences"])
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["adapter_sum"] == ranks[1]["adapter_sum"]
    assert (out / "plan.json").is_file() and (out / "search_log.json").is_file()
    # Only rank 0 writes: rank 1 touched nothing under the output folder, rank 0 wrote every output.
    assert ranks[1]["writes"] == []
    written = "\n".join(ranks[0]["writes"])
    for name in ("plan.json", "search_log.json", "preferences.png", "search_checkpoint", "train_checkpoint"):
        assert name in written, name
    assert (out / "train" / "adapters" / "adapter_model.safetensors").is_file()


def test_two_ranks_keep_identical_preferences_and_only_rank_0_writes(tmp_path):
    # --standalone: a local rendezvous on a port torchrun picks itself
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out, ranks = launch(torchrun, tmp_path)
    assert_ranks_agree_and_only_rank_0_writes(out, ranks)

    # Data-parallel training over 2 ranks == one process accumulating the same pairs of batches.
    model, batches, _ = data(32)
    config = skipvlm.TrainConfig(epochs=1, lr=1e-2, grad_accum=2, progress=False)
    single = skipvlm.train(model, batches, config, eas=skipvlm.EASConfig(skip_attention=[1, 2]))
    parallel = load_file(str(out / "train" / "adapters" / "adapter_model.safetensors"))
    state = single.adapter_state_dict()
    assert parallel.keys() == state.keys()
    moved = max(float(v.float().abs().max()) for k, v in state.items() if "up." in k)
    assert moved > 1e-3  # the fresh up-projections are zero: training moved them
    for name, value in state.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_data_parallel_search(tmp_path):
    # On a machine without GPUs, `--multi_gpu` is what starts N processes (`--cpu` starts one); the
    # processes then join a gloo group on the CPU. HOME: no user accelerate config applies.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
    ]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    accelerate += ["--main_process_port", str(port)]
    out, ranks = launch(accelerate, tmp_path, env={"HOME": str(tmp_path)})
    assert_ranks_agree_and_only_rank_0_writes(out, ranks)
