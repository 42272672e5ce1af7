"""The `skipvlm` command line: the demo runs end to end and reports what it measured."""

import json

import pytest
import torch

import skipvlm
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
    assert result["torch"] == torch.__version__ and result["device"] == "cpu"  # run_info beside the rows


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


def hand_normalise(text: str) -> str:
    words = "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


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
    assert result["total"] == base_eval["total"] == 6
    for scored in (base_eval, result):  # exact match, by hand: lower case, no punctuation or articles
        right = [
            hand_normalise(p["prediction"]) == hand_normalise(p["answer"]) for p in scored["predictions"]
        ]
        assert [p["correct"] for p in scored["predictions"]] == right
        assert scored["correct"] == sum(right) and scored["accuracy"] == sum(right) / 6
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
    from skipvlm.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("loaded the model before checking"))
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
    assert main([*ask, "--visual-exit-layer", "2", "--skip-attention", "3"]) == 0
    exited = capsys.readouterr()
    assert "visual tokens left at layer 2" in exited.err
    assert '"skip_attention": [3]' in exited.err and '"visual_exit_layer": 2' in exited.err
    assert plain.out.strip() and exited.out.strip()

    data = ["--data", str(toy_dir / "heldout.jsonl"), "--batch-size", "4"]
    calibrate = ["calibrate-vtw", *model, *data, "--out", str(tmp_path / "vtw")]
    assert main([*calibrate, "--eta", "0", "--min-layer", "1", "--limit", "6"]) == 0
    assert "VTW exit layer 4 of 4" in capsys.readouterr().out  # no K reaches KL 0: every token stays
    assert json.loads((tmp_path / "vtw" / "plan.json").read_text())["visual_exit_layer"] is None
    saved = json.loads((tmp_path / "vtw" / "vtw_calibration.json").read_text())
    assert saved["num_examples"] == 6 and saved["min_layer"] == 1 and saved["eta"] == 0
    # the curve is the library's on the same six examples
    from skipvlm.data import ChatCollator, load_processor
    from skipvlm.data.formats import load_chat_jsonl
    from skipvlm.export import load_pretrained

    examples = load_chat_jsonl(toy_dir / "heldout.jsonl").examples[:6]
    collator = ChatCollator(load_processor(toy_dir / "model"))
    api = skipvlm.calibrate_vtw(
        load_pretrained(toy_dir / "model"), examples, eta=0, collator=collator, batch_size=4, progress=False
    )
    assert saved["kl"] == pytest.approx({str(k): v for k, v in api.kl.items()}, rel=1e-6)
    assert min(api.kl.values()) > 0
    eta = saved["kl"]["2"]
    assert main([*calibrate, "--eta", repr(eta), "--min-layer", "2", "--limit", "6"]) == 0
    assert "VTW exit layer 2 of 4" in capsys.readouterr().out  # KL at 2 == eta: the first K under it
    saved = json.loads((tmp_path / "vtw" / "vtw_calibration.json").read_text())
    assert saved["layer"] == 2 and saved["eta"] == eta
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


def test_eval_reads_every_format_and_scores_exact_or_vqa(toy_dir, tmp_path):
    import datasets

    rows = [json.loads(line) for line in (toy_dir / "test.jsonl").read_text().splitlines()]
    common = ["eval", "--model", str(toy_dir / "model"), "--batch-size", "4", "--max-new-tokens", "4"]

    def run(data, *extra) -> dict:
        out = tmp_path / f"eval{len(list(tmp_path.glob('eval*')))}"
        assert main([*common, "--data", str(data), *extra, "--out", str(out)]) == 0
        return json.loads((out / "eval.json").read_text())

    base = run(toy_dir / "test.jsonl")
    predictions = [p["prediction"] for p in base["predictions"]]
    llava = [
        {
            "id": r["id"],
            "image": r["image"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + r["prompt"]},
                {"from": "gpt", "value": r["answer"]},
            ],
        }
        for r in rows
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    hf = {
        "question": [r["prompt"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "image": [str(toy_dir / r["image"]) for r in rows],
    }
    datasets.Dataset.from_dict(hf).to_parquet(str(tmp_path / "data.parquet"))
    for data, fmt in ((tmp_path / "llava.json", "llava"), (tmp_path / "data.parquet", "hf")):
        same = run(data, "--format", fmt, "--image-folder", str(toy_dir))
        assert same["total"] == 6 and [p["prediction"] for p in same["predictions"]] == predictions, fmt

    # Answers built from the predictions: exact match and VQA matching differ on hyphens.
    hyphen = [i for i, p in enumerate(predictions[:5]) if len(p.split()) >= 2][:2]
    assert len(hyphen) == 2, predictions
    answers = []
    for i, p in enumerate(predictions):
        if i in hyphen:
            answers.append("-".join(p.split()))  # VQA splits on "-", exact match glues the words
        elif i == 5:
            answers.append("zebra")  # wrong for both
        else:
            answers.append(p.upper() + "!")  # right for both: case and "!" are ignored
    exact, vqa = 3, 5
    with (tmp_path / "built.jsonl").open("w") as f:
        for r, answer in zip(rows, answers, strict=True):
            f.write(json.dumps({**r, "answer": answer, "image": str(toy_dir / r["image"])}) + "\n")
    scored = {metric: run(tmp_path / "built.jsonl", "--metric", metric) for metric in ("exact", "vqa")}
    assert (scored["exact"]["correct"], scored["vqa"]["correct"]) == (exact, vqa) and exact < vqa
    assert scored["vqa"]["accuracy"] == vqa / 6 and scored["exact"]["accuracy"] == exact / 6


def test_train_options_reach_the_loop_and_eval_merges_as_asked(toy_dir, tmp_path, monkeypatch):
    forward, checkpoint = skipvlm.EASModel.forward, torch.utils.checkpoint.checkpoint
    autocast, recomputed = [], []

    def spy_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return forward(self, *args, **kwargs)

    def spy_checkpoint(*args, **kwargs):
        recomputed.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(skipvlm.EASModel, "forward", spy_forward)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy_checkpoint)
    run = tmp_path / "run"
    common = ["--model", str(toy_dir / "model"), "--batch-size", "4"]
    train = [
        "train",
        *common,
        "--train",
        str(toy_dir / "train.jsonl"),
        "--skip-attention",
        "1",
        "--epochs",
        "1",
    ]
    args = [*train, "--precision", "bf16", "--gradient-checkpointing", "--no-progress", "--out", str(run)]
    assert main(args) == 0
    assert autocast == [(True, torch.bfloat16)] * 4  # 4 training batches, each under bf16 autocast
    assert len(recomputed) == 4 * 4  # and each of the 4 layers recomputed in the backward pass
    config = json.loads((run / "train_log.json").read_text())["config"]
    assert config["precision"] == "bf16" and config["gradient_checkpointing"] is True

    merges = []
    merge = skipvlm.EASModel.merge_and_unload

    def spy_merge(self, mode="static"):
        merges.append(mode)
        return merge(self, mode)

    monkeypatch.setattr(skipvlm.EASModel, "merge_and_unload", spy_merge)
    evaluated = {}
    for mode in ("none", "static", "per_example"):
        out = tmp_path / mode
        # a per-example merge folds one prompt at a time: batch size 1 (the default 8 is refused)
        data = ["--data", str(toy_dir / "test.jsonl"), "--max-new-tokens", "4", "--batch-size", "1"]
        assert (
            main(
                [
                    "eval",
                    *common,
                    *data,
                    "--adapters",
                    str(run / "adapters"),
                    "--merge",
                    mode,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        evaluated[mode] = [
            p["prediction"] for p in json.loads((out / "eval.json").read_text())["predictions"]
        ]
    assert merges == ["static", "per_example"]
    assert evaluated["per_example"] == evaluated["none"]  # the per-example merge is exact


def test_token_exit_options_are_the_plan_fields_and_read_back_into_a_plan():
    import argparse

    from skipvlm.cli import build_parser
    from skipvlm.cli.options import plan_from_args
    from skipvlm.plan import token_exit_fields

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    offered = {a.dest for a in generate._actions}
    fields = {f.name for f in token_exit_fields()}
    assert {"visual_exit_layer", "fastv_layer", "fastv_ratio", "fastv_source", "dyvte"} <= fields <= offered
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--fastv-layer", "3"])
    args.fastv_ratio = 0.25
    assert plan_from_args(args, skipvlm.Plan(skip_attention=[1])) == skipvlm.Plan(
        skip_attention=[1], fastv_layer=3, fastv_ratio=0.25
    )
    with pytest.raises(ValueError, match="--fastv-ratio has no effect without --fastv-layer"):
        plan_from_args(argparse.Namespace(fastv_ratio=0.25), skipvlm.Plan())


def test_ffn_replacement_that_would_replace_nothing_is_refused_before_data_loads(toy_dir, tmp_path, capsys):
    missing = str(tmp_path / "no_such.jsonl")  # the refusal comes before any data is read
    common = ["--model", str(toy_dir / "model"), "--train", missing, "--mlp-replace", "pia"]
    train = ["train", *common, "--out", str(tmp_path / "t"), "--skip-attention", "1"]
    assert main(train) == 2
    assert "--mlp-replace pia replaces skipped MLPs, but this plan skips none" in capsys.readouterr().err
    search = ["search", *common, "--heldout", missing, "--out", str(tmp_path / "s"), "--k", "1"]
    assert main(search) == 2
    err = capsys.readouterr().err
    assert "an 'attention' supernet never skips one" in err and "candidates='mlp'" in err
