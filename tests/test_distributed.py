"""Two processes under torchrun (gloo, CPU): the same subsets, the same preferences, the same adapters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_two_ranks_keep_identical_preferences(tmp_path):
    script = Path(__file__).with_name("dist_search.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a local rendezvous on a port torchrun picks itself
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["updates"] == 8  # 32 batches / 2 ranks = 4 steps per epoch x 2 search epochs
    assert ranks[0]["preferences"] == ranks[1]["preferences"]
    assert any(p != 0 for p in ranks[0]["preferences"])
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["adapter_sum"] == ranks[1]["adapter_sum"]
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "search_log.json").is_file()
