"""The `skipvlm` command line: the demo runs end to end and reports what it measured."""

import json

import pytest

from skipvlm.cli import main


def test_demo_runs_and_writes_its_measurements(tmp_path, capsys):
    assert main(["demo", "--repeats", "2", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cached generation == full recompute under a skip plan: True" in out
    result = json.loads((tmp_path / "showcase.json").read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["stock", "skip 4 attn", "skip 4 attn+2 mlp"]
    stock, skipped = result["rows"][0], result["rows"][1]
    assert skipped["plan"]["skip_attention"] == [1, 3, 5, 7]
    assert skipped["kv_cache_bytes"] * 2 == stock["kv_cache_bytes"]
    assert all(row["prefill_ms"] > 0 and row["decode_ms_per_token"] >= 0 for row in result["rows"])
    assert result["image_tokens"] == 256


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and "skipvlm" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_bad_arguments_give_a_clear_error_not_a_traceback(capsys):
    assert main(["demo", "--new-tokens", "1"]) == 2
    assert "new_tokens must be >= 2" in capsys.readouterr().err
