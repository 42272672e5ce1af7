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


def _fake_python(tmp_path: Path, fail_when: str) -> str:
    """A PYTHON that runs this interpreter, but exits 1 for a command line holding ``fail_when``."""
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\ncase "$*" in *"{fail_when}"*) echo "simulated failure" >&2; exit 1 ;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return str(fake)


def test_gpu_suite_writes_its_json_and_names_the_parts_that_failed(tmp_path):
    # every bench fails here (a GPU run: out of memory, a compiler error): the suite still writes its
    # JSON, names both parts and exits 1, instead of stopping at the first and losing the other
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHON": _fake_python(tmp_path, "skipvlm.cli bench"), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "gpu_suite.sh")
    done = subprocess.run(
        ["bash", script, "--dry-run", "--out", str(out)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "part serving failed" in done.stderr and "part lavin_vs_eas failed" in done.stderr
    suite = json.loads(out.read_text())
    assert suite["failed"] == ["serving", "lavin_vs_eas"]
    assert suite["parts"]["serving"] == {"rows": [], "partial": True, "error": "not run"}


def test_gpu_suite_stops_before_any_work_without_a_gpu_or_with_missing_wheels(tmp_path):
    script = str(ROOT / "benchmarks" / "gpu_suite.sh")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", script, "--out", str(tmp_path / "s.json")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 3 and "torch sees no CUDA device" in done.stderr
    empty = tmp_path / "wheels"
    empty.mkdir()
    env["PYTHON"] = _fake_python(tmp_path, "pip install")
    done = subprocess.run(["bash", script, "--wheels", str(empty)], env=env, capture_output=True, text=True)
    assert done.returncode == 3 and "could not install transformers" in done.stderr
    assert not (tmp_path / "s.json").exists()
