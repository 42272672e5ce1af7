"""The `skipvlm` command line: the demo runs end to end and reports what it measured."""

import json

import pytest

from skipvlm.cli import main


def test_showcase_runs_and_writes_its_measurements(tmp_path, capsys):
    assert main(["showcase", "--repeats", "2", "--new-tokens", "4", "--out", str(tmp_path)]) == 0
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
    assert main(["showcase", "--new-tokens", "1"]) == 2
    assert "new_tokens must be >= 2" in capsys.readouterr().err


def test_search_train_merge_eval_end_to_end(toy_dir, tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    common = ["--model", str(toy_dir / "model"), "--batch-size", "4"]
    search = [
        "search",
        *common,
        "--train",
        str(toy_dir / "train.jsonl"),
        "--heldout",
        str(toy_dir / "heldout.jsonl"),
    ]
    search += [
        "--k",
        "2",
        "--warmup-epochs",
        "1",
        "--search-epochs",
        "2",
        "--interval",
        "1",
        "--out",
        str(run),
    ]
    assert main([*search, "--no-progress", "--lr", "0.01"]) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert len(plan["skip_attention"]) == 2
    assert (run / "preferences.png").is_file() and (run / "search_log.json").is_file()

    train = ["train", *common, "--train", str(toy_dir / "train.jsonl"), "--plan", str(run / "plan.json")]
    assert main([*train, "--epochs", "2", "--out", str(run), "--no-progress"]) == 0
    assert (run / "adapters" / "adapter_model.safetensors").is_file()

    assert (
        main(
            [
                "merge",
                "--model",
                str(toy_dir / "model"),
                "--adapters",
                str(run / "adapters"),
                "--out",
                str(merged),
            ]
        )
        == 0
    )
    assert (merged / "tokenizer.json").is_file()
    assert (
        json.loads((merged / "config.json").read_text())["skipvlm_plan"]["skip_attention"]
        == plan["skip_attention"]
    )

    assert main(["eval", *common, "--data", str(toy_dir / "test.jsonl"), "--out", str(run)]) == 0
    base_eval = json.loads((run / "eval.json").read_text())
    evaluated = ["eval", "--model", str(merged), "--data", str(toy_dir / "test.jsonl"), "--out", str(run)]
    assert main(evaluated) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["total"] == base_eval["total"] == 6 and 0 <= result["accuracy"] <= 1
    assert "accuracy" in capsys.readouterr().out

    unmerged = ["eval", *common, "--data", str(toy_dir / "test.jsonl"), "--adapters", str(run / "adapters")]
    assert main([*unmerged, "--out", str(tmp_path / "u")]) == 0
    same = json.loads((tmp_path / "u" / "eval.json").read_text())
    assert [p["prediction"] for p in same["predictions"]] == [p["prediction"] for p in result["predictions"]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "9"], "k=9 is larger than the 4 'attention' candidates"),
        (["--k", "2", "--interval", "99"], "interval=99 is larger than the search phase"),
        (["--k", "4"], "only 1 subset(s) of k=4 out of 4 candidates exist"),
    ],
)
def test_search_settings_are_checked_before_loading_the_model(
    toy_dir, tmp_path, capsys, monkeypatch, extra, message
):
    import skipvlm.cli as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("loaded the model before checking"))
    args = ["search", "--model", str(toy_dir / "model"), "--train", str(toy_dir / "train.jsonl")]
    args += ["--heldout", str(toy_dir / "heldout.jsonl"), "--out", str(tmp_path), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_data_fail_clearly(toy_dir, tmp_path, capsys):
    args = ["search", "--model", str(tmp_path / "nope"), "--train", str(toy_dir / "train.jsonl")]
    assert main([*args, "--heldout", str(toy_dir / "heldout.jsonl"), "--out", str(tmp_path)]) == 2
    assert "model folder" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    args = ["train", "--model", str(toy_dir / "model"), "--train", str(bad), "--out", str(tmp_path)]
    assert main(args) == 2  # the only row is bad: skipped, listed, and nothing is left to train on
    err = capsys.readouterr().err
    assert "bad.jsonl row 1: the answer is empty" in err and "no usable examples" in err
    assert main([*args, "--on-bad-row", "fail"]) == 2
    assert "bad.jsonl row 1: the answer is empty (pass on_bad_row='skip'" in capsys.readouterr().err


def test_token_exit_commands_end_to_end(toy_dir, tmp_path, capsys):
    model = ["--model", str(toy_dir / "model")]
    image = str(toy_dir / "images" / sorted(p.name for p in (toy_dir / "images").iterdir())[0])
    ask = [
        "generate",
        *model,
        "--prompt",
        "what color is the square?",
        "--image",
        image,
        "--max-new-tokens",
        "3",
    ]
    assert main(ask) == 0
    plain = capsys.readouterr()
    assert main([*ask, "--visual-exit-layer", "2", "--skip-attention-layers", "3"]) == 0
    exited = capsys.readouterr()
    assert "visual tokens left at layer 2" in exited.err
    assert '"skip_attention": [3]' in exited.err and '"visual_exit_layer": 2' in exited.err
    assert plain.out.strip() and exited.out.strip()

    data = ["--data", str(toy_dir / "heldout.jsonl"), "--batch-size", "4"]
    args = [
        "calibrate-vtw",
        *model,
        *data,
        "--out",
        str(tmp_path / "vtw"),
        "--eta",
        "1e9",
        "--min-layer",
        "2",
    ]
    assert main(args) == 0
    assert "VTW exit layer 2 of 4" in capsys.readouterr().out
    saved = json.loads((tmp_path / "vtw" / "vtw_calibration.json").read_text())
    assert saved["layer"] == 2 and saved["num_examples"] == 8
    assert json.loads((tmp_path / "vtw" / "plan.json").read_text())["visual_exit_layer"] == 2
    assert (tmp_path / "vtw" / "vtw_kl.png").is_file()
    assert main([*ask, "--plan", str(tmp_path / "vtw" / "plan.json")]) == 0
    assert "visual tokens left at layer 2" in capsys.readouterr().err

    routers = tmp_path / "routers"
    train = ["train-dyvte", *model, "--train", str(toy_dir / "train.jsonl"), "--out", str(routers)]
    assert main([*train, "--steps", "5", "--layers", "1,2", "--max-new-tokens", "2"]) == 0
    assert "trained routers for layers [1, 2] on" in capsys.readouterr().out
    assert main([*ask, "--dyvte", str(routers), "--dyvte-threshold", "0"]) == 0
    assert "visual tokens left at layer 1" in capsys.readouterr().err

    assert main([*ask, "--dyvte", str(tmp_path / "nowhere")]) == 2
    assert "no DyVTE routers at" in capsys.readouterr().err
    assert main([*ask, "--visual-exit-layer", "9"]) == 2
    assert "visual_exit_layer is 9, but the model has 4 decoder layers" in capsys.readouterr().err
    assert main(["generate", *model, "--prompt", "x", "--image", str(tmp_path / "none.png")]) == 2
    assert "no image at" in capsys.readouterr().err
