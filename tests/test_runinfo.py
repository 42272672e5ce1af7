"""run_info: the metadata every results file carries (versions, device, threads, source commit, date)."""

import datetime
import json
import shutil
import subprocess

import pytest
import torch
import transformers

import skipvlm
from skipvlm import runinfo
from skipvlm.runinfo import run_info


def test_run_info_records_versions_device_dtype_and_threads_as_json():
    info = json.loads(json.dumps(run_info("cpu", torch.bfloat16)))
    assert info["skipvlm"] == skipvlm.__version__
    assert info["torch"] == torch.__version__ and info["transformers"] == transformers.__version__
    assert info["device"] == "cpu" and info["dtype"] == "bfloat16" and info["gpu"] is None
    assert info["threads"] == torch.get_num_threads()
    assert datetime.datetime.fromisoformat(info["date"]).tzinfo is not None
    assert run_info()["device"] is None and run_info()["dtype"] is None


def _git(folder, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=folder,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_run_info_reports_the_commit_of_a_checkout_only_where_skipvlm_is_tracked(tmp_path, monkeypatch):
    package = tmp_path / "skipvlm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "other project")
    monkeypatch.setattr(runinfo, "_SOURCE", package)
    # a skipvlm copy inside some other repository (an untracked virtual environment) is not that commit
    assert (run_info()["git_commit"], run_info()["git_dirty"]) == (None, None)

    _git(tmp_path, "add", "skipvlm/__init__.py")
    _git(tmp_path, "commit", "-q", "-m", "skipvlm")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    assert (run_info()["git_commit"], run_info()["git_dirty"]) == (head.stdout.strip(), False)
    (package / "__init__.py").write_text("x = 1\n")
    assert run_info()["git_dirty"] is True
