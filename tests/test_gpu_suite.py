"""benchmarks/gpu_suite.sh: its CPU dry run (the same steps on a tiny LLaVA) writes the suite's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    suite = json.loads(out.read_text())
    serving, lavin = suite["parts"]["serving"]["rows"], suite["parts"]["lavin_vs_eas"]["rows"]
    kinds = {(r["name"], r["batch_size"], r["mode"]) for r in serving}
    for batch in (1, 2):
        for name in ("stock", "eas k=3 (merged)"):
            assert {(name, batch, "eager"), (name, batch, "compiled")} <= kinds
        for name in ("vtw K=4", "eas k=3 + vtw K=4"):  # token exit: eager only
            assert (name, batch, "eager") in kinds and (name, batch, "compiled") not in kinds
    assert {r["name"] for r in lavin} == {"stock", "lavin (unmerged)", "eas k=3 (merged)"}
    summary = suite["parts"]["lavin_vs_eas"]["summary"]
    assert any(key.startswith("eas k=3 (merged) vs lavin (unmerged) B=2 compiled") for key in summary)
    assert suite["parts"]["serving"]["meta"]["args"]["batch_size"] == "[1, 2]"


def test_gpu_suite_refuses_an_unknown_option():
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--fast"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown option --fast" in done.stderr
