"""The README runs: every Python block and every shell block, as written, on the bundled toy."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_the_readme_opens_with_the_two_commands():
    lines = README.splitlines()
    assert lines[2:4] == [
        "    make demo     # creates .venv if needed, installs, runs the end-to-end demo",
        "    make test     # creates .venv if needed, installs, runs the test suite",
    ]


def test_the_readme_has_the_blocks_this_test_runs():
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 1


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(blocks("python")[index], f"README.md python block {index}", "exec")
    exec(code, {"__name__": "__readme__"})


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("bash"))))
def test_shell_block_runs(index, tmp_path):
    bin_dir = pathlib.Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = "set -euo pipefail\n" + blocks("bash")[index]
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accuracy" in done.stdout
