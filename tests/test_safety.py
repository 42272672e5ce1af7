"""Nothing lost, nothing run, nothing silent: output folders, resume, untrusted folders, bad input."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import signal
import socket

import pytest
import torch
from PIL import Image

import skipvlm
from skipvlm.cli import main
from skipvlm.io import atomic_dir, recover_dir
from skipvlm.outputs import LOCK, claim_output
from skipvlm.train import Interrupted

from conftest import colour_examples, toy_parts

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "skipvlm"


def no_load(monkeypatch):
    from skipvlm.cli import loading

    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("loaded weights before checking"))


def err_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipvlm ")]
    assert len(lines) == 1, lines
    return lines[0]


# --- output folders -------------------------------------------------------------------------------------


def test_merge_keeps_every_other_file_in_out(toy_dir, tmp_path):
    adapters = tmp_path / "run" / "adapters"
    from skipvlm.data import ChatCollator

    model, processor = toy_parts()
    eas = skipvlm.get_eas_model(model, skipvlm.EASConfig(skip_attention=[1]))
    eas.calibrate([ChatCollator(processor)(colour_examples(4))], progress=False)
    eas.save_pretrained(adapters)
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    args = ["merge", "--model", str(toy_dir / "model"), "--adapters", str(adapters), "--out", str(run)]
    assert main(args) == 2  # not created by skipvlm (the adapters were saved by hand)
    assert main([*args, "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "adapters" / "adapter_model.safetensors").is_file()
    assert (run / "config.json").is_file() and (run / "tokenizer.json").is_file()


@pytest.mark.parametrize("where", ["model", "model/sub"])
def test_out_inside_an_input_is_refused(toy_dir, tmp_path, capsys, monkeypatch, where):
    no_load(monkeypatch)
    before = sorted(p.name for p in (toy_dir / "model").iterdir())
    args = ["merge", "--model", str(toy_dir / "model"), "--adapters", str(tmp_path), "--out"]
    assert main([*args, str(toy_dir / where), "--overwrite"]) == 2
    assert "skipvlm never writes into its inputs" in err_line(capsys)
    assert sorted(p.name for p in (toy_dir / "model").iterdir()) == before


def test_out_problems_surface_before_any_weights_load(toy_dir, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    train = ["train", "--model", str(toy_dir / "model"), "--train", str(toy_dir / "train.jsonl")]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main([*train, "--out", str(afile)]) == 2
    assert "is a file, not a folder" in err_line(capsys)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    assert main([*train, "--out", str(foreign)]) == 2
    assert "not created by skipvlm" in err_line(capsys) and (foreign / "thesis.tex").is_file()

    clash = tmp_path / "clash"
    with claim_output(clash, "search"):
        pass
    (clash / "adapters").write_text("a file where the adapters folder goes")
    assert main([*train, "--out", str(clash)]) == 2
    assert "adapters exists and is not a folder" in err_line(capsys)
    assert (clash / "adapters").read_text().startswith("a file")


def test_another_kind_of_output_is_refused(tmp_path):
    with claim_output(tmp_path / "m", "merge", kind="checkpoint"):
        (tmp_path / "m" / "config.json").write_text("{}")
    expected = "holds a skipvlm checkpoint output, and search writes a run"
    with pytest.raises(ValueError, match=expected), claim_output(tmp_path / "m", "search", kind="run"):
        pass


def test_a_second_concurrent_run_is_refused_naming_the_other(tmp_path):
    out = tmp_path / "o"
    with claim_output(out, "train"):
        assert (out / LOCK).is_file()
        expected = rf"another skipvlm train \(pid {os.getpid()} .*is writing"
        with pytest.raises(ValueError, match=expected), claim_output(out, "search"):
            pass
    assert not (out / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    (out / LOCK).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "train"}))
    with claim_output(out, "train"):
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()


def test_exports_replace_their_own_files_only(tmp_path):
    model, processor = toy_parts()
    out = tmp_path / "toy"
    out.mkdir()
    (out / "README.md").write_text("notes")
    from skipvlm import toy

    toy.save_toy(model, processor, out)
    assert (out / "README.md").read_text() == "notes" and (out / "config.json").is_file()
    assert not list(out.glob(".staging.*"))


def test_written_files_follow_the_umask(tmp_path):
    from skipvlm.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# --- resume -----------------------------------------------------------------------------------------------


def _data():
    from skipvlm.data import ChatCollator

    model, processor = toy_parts()
    collate = ChatCollator(processor)
    ex = colour_examples(16, seed=0)
    return model, [collate(ex[i : i + 4]) for i in range(0, 16, 4)]


def _adapters(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


CONFIG = dict(epochs=2, lr=1e-2, checkpoint_every=2, progress=False, calibrate=False)


class Killed(Exception):
    pass


def _killed_at(step, out):
    def kill(event):
        if event["step"] == step:
            raise Killed

    model, batches = _data()
    with pytest.raises(Killed):
        skipvlm.train(model, batches, skipvlm.TrainConfig(**CONFIG), out=out, callback=kill)


@pytest.mark.parametrize("state", ["only_old", "old_and_new", "stale_tmp"])
def test_resume_recovers_every_state_of_an_interrupted_swap(tmp_path, state):
    model, batches = _data()
    full = _adapters(skipvlm.train(model, batches, skipvlm.TrainConfig(**CONFIG)))
    _killed_at(5, tmp_path)  # checkpoints at steps 2 and 4
    ckpt = tmp_path / "train_checkpoint"
    old = tmp_path / ".train_checkpoint.old"
    if state == "only_old":  # killed between the two renames of the next save
        ckpt.rename(old)
    elif state == "old_and_new":  # killed before the old folder was removed
        shutil.copytree(ckpt, old)
    else:  # killed while writing the staging folder
        (tmp_path / ".train_checkpoint.abc.tmp").mkdir()
        (tmp_path / ".train_checkpoint.abc.tmp" / "state.safetensors").write_bytes(b"half")
    model, batches = _data()
    resumed = skipvlm.train(model, batches, skipvlm.TrainConfig(**CONFIG), out=tmp_path, resume=True)
    assert _adapters(resumed).keys() == full.keys()
    for k in full:
        torch.testing.assert_close(_adapters(resumed)[k], full[k], rtol=0, atol=0)
    assert not old.exists() and not list(tmp_path.glob(".train_checkpoint.*.tmp"))


def test_recover_dir_reports_what_it_did(tmp_path):
    target = tmp_path / "c"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
    assert recover_dir(target) is None
    target.rename(tmp_path / ".c.old")
    assert "restored" in recover_dir(target) and (target / "a").read_text() == "1"


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    model, batches = _data()
    with pytest.raises(ValueError, match=r"no checkpoint to resume in .*drop --resume"):
        skipvlm.train(model, batches, skipvlm.TrainConfig(**CONFIG), out=tmp_path, resume=True)


def test_resume_names_the_changed_settings_and_refuses_other_data(tmp_path):
    _killed_at(3, tmp_path)
    model, batches = _data()
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.02"):
        skipvlm.train(
            model, batches, skipvlm.TrainConfig(**{**CONFIG, "lr": 2e-2}), out=tmp_path, resume=True
        )
    model, batches = _data()
    batches = batches[::-1]
    with pytest.raises(ValueError, match=r"data: [0-9a-f]+ -> [0-9a-f]+"):
        skipvlm.train(model, batches, skipvlm.TrainConfig(**CONFIG), out=tmp_path, resume=True)


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path):
    config = skipvlm.TrainConfig(**{**CONFIG, "checkpoint_every": 0})  # no periodic saves: Ctrl-C alone saves
    model, batches = _data()
    full = _adapters(skipvlm.train(model, batches, config))

    def ctrl_c(event):
        if event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    model, batches = _data()
    with pytest.raises(Interrupted, match=r"step 3 of 8; checkpoint saved.*--resume"):
        skipvlm.train(model, batches, config, out=tmp_path, callback=ctrl_c)
    model, batches = _data()
    resumed = _adapters(skipvlm.train(model, batches, config, out=tmp_path, resume=True))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)


# --- untrusted folders -------------------------------------------------------------------------------------


def test_every_transformers_from_pretrained_passes_trust_remote_code_false():
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained"):
                continue
            receiver = ast.unparse(node.func.value)
            if receiver in ("EASModel", "cls", "skipvlm.EASModel", "EncoderEASModel"):
                continue  # skipvlm's own loader: reads safetensors and JSON only
            ok = any(
                k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                for k in node.keywords
            )
            if not ok:
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)[:60]}")
    assert offenders == []


def _broken_copy(toy_dir, tmp_path, change):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(toy_dir / "model", folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    change(state)
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop(next(k for k in s if k.endswith("layers.1.self_attn.q_proj.weight"))), "1 missing"),
        (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), "1 the model does not have"),
        (
            lambda s: s.__setitem__(
                next(k for k in s if k.endswith("layers.0.mlp.up_proj.weight")),
                torch.full((64, 32), float("nan")),
            ),
            "NaN or infinite",
        ),
    ],
)
def test_checkpoints_with_wrong_tensors_are_refused(toy_dir, tmp_path, change, message):
    folder = _broken_copy(toy_dir, tmp_path, change)
    with pytest.raises(ValueError, match=message):
        skipvlm.load_pretrained(folder)


def test_missing_tensors_load_only_when_asked(toy_dir, tmp_path, capsys):
    folder = _broken_copy(
        toy_dir, tmp_path, lambda s: s.pop(next(k for k in s if "layers.1.self_attn.q_proj" in k))
    )
    assert skipvlm.load_pretrained(folder, allow_missing_weights=True) is not None
    args = ["generate", "--model", str(folder), "--prompt", "what color is the square?"]
    assert main(args) == 2 and "missing" in err_line(capsys)
    assert main([*args, "--allow-missing-weights", "--max-new-tokens", "2"]) == 0


def test_truncated_weights_are_one_line_errors(toy_dir, tmp_path, capsys):
    folder = tmp_path / "trunc"
    shutil.copytree(toy_dir / "model", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", "--model", str(folder), "--prompt", "what"]) == 2
    assert "cannot be read" in err_line(capsys)


def test_a_failed_adapter_load_leaves_the_base_model_untouched(tmp_path):
    model, _ = toy_parts()
    eas = skipvlm.get_eas_model(toy_parts()[0], skipvlm.EASConfig(skip_attention=[1]))
    eas.save_pretrained(tmp_path / "a")
    state = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(state[:-40])
    grads = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        skipvlm.EASModel.from_pretrained(model, tmp_path / "a")
    (tmp_path / "a" / "eas_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        skipvlm.EASModel.from_pretrained(model, tmp_path / "a")
    assert [p.requires_grad for p in model.parameters()] == grads
    assert skipvlm.current_plan(model).is_empty
    skipvlm.get_eas_model(model, skipvlm.EASConfig(skip_attention=[2]))  # still a plain base model


# --- plans record what they need ------------------------------------------------------------------------


def test_a_searched_plan_records_its_candidate_kind(tmp_path):
    from skipvlm.data import ChatCollator

    model, processor = toy_parts()
    collate = ChatCollator(processor)
    ex, held = colour_examples(8, seed=0), colour_examples(4, seed=1)
    batches = [collate(ex[i : i + 4]) for i in (0, 4)]
    config = skipvlm.SearchConfig(
        k=1,
        candidates="layer",
        warmup_epochs=1,
        search_epochs=1,
        interval=1,
        n_candidates=2,
        train=skipvlm.TrainConfig(progress=False),
    )
    skipvlm.search(model, batches, [collate(held)], config, out=tmp_path)
    plan = skipvlm.Plan.load(tmp_path / "plan.json")
    assert plan.candidates == "layer"
    from skipvlm.train import eas_config_for_plan

    assert eas_config_for_plan(plan, plan.candidates).skip_layers == list(plan.skip_attention)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plan", "PLAN", "--skip-attention", "2"], "--plan and --skip-attention both say what to skip"),
        (["--skip-attention", ""], "expected at least one layer index"),
        (
            ["--skip-attention", "1,9"],
            "--skip-attention 1,9: the model has 4 decoder layers, so there is no layer 9",
        ),
        (["--skip-layers", "4"], "--skip-layers lists layer indices 0..3"),
        (["--skip-attention-count", "2"], "unrecognized arguments: --skip-attention-count"),
        (["--plan", "PLAN", "--candidates", "attention"], "contradicts"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--batch-size", "-1"], "expected a positive integer"),
        (["--lr", "inf"], "TrainConfig.lr must be a finite number"),
        (["--scale", "nan"], "EASConfig.scale must be a finite number"),
        (["--dtype", "float16"], "--precision fp16"),
        (["--device", "cuda"], "no CUDA device"),
        (["--max-length", "100000"], "exceeds the model's"),
    ],
)
def test_bad_train_flags_are_one_line_errors(toy_dir, tmp_path, capsys, monkeypatch, extra, message):
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    no_load(monkeypatch)
    skipvlm.Plan(skip_attention=[1], candidates="layer").save(tmp_path / "plan.json")
    extra = [str(tmp_path / "plan.json") if e == "PLAN" else e for e in extra]
    args = ["train", "--model", str(toy_dir / "model"), "--train", str(toy_dir / "train.jsonl")]
    try:
        code = main([*args, "--out", str(tmp_path / "o"), *extra])
    except SystemExit as exit_:  # argparse's own check of the value
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_ignored_token_flags_are_errors(toy_dir, capsys):
    args = ["generate", "--model", str(toy_dir / "model"), "--prompt", "what", "--fastv-ratio", "0.3"]
    assert main(args) == 2
    assert "--fastv-ratio has no effect without --fastv-layer" in err_line(capsys)
    args = ["cost", "--model", str(toy_dir / "model"), "--dyvte-threshold", "0.3"]
    with pytest.raises(SystemExit):  # cost has no DyVTE option at all
        main(args)


def test_skip_layers_beyond_the_model_fail_before_it_loads(toy_dir, capsys, monkeypatch):
    no_load(monkeypatch)
    args = ["generate", "--model", str(toy_dir / "model"), "--prompt", "what", "--skip-attention", "7"]
    assert main(args) == 2
    line = err_line(capsys)
    assert "--skip-attention 7: the model has 4 decoder layers" in line and "e.g. 1,3" in line
    assert "--skip-attention-count" not in line  # generate has no count option to point at


def test_calibrate_limit_must_be_positive(toy_dir, tmp_path, capsys):
    args = ["calibrate-vtw", "--model", str(toy_dir / "model"), "--data", str(toy_dir / "test.jsonl")]
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "v"), "--limit", "-3"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_cost_reads_configs_without_remote_code(toy_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(toy_dir / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert main(["cost", "--model", str(folder), "--prompt-tokens", "32"]) == 0


# --- bad rows ----------------------------------------------------------------------------------------------


def test_undecodable_and_escaping_images_are_bad_rows(tmp_path):
    from skipvlm.data import formats

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(images / "ok.png")
    good = (images / "ok.png").read_bytes()
    # valid PNG chunks and checksums, but the compressed pixel data is not a zlib stream
    import struct
    import zlib

    idat = b"not zlib at all"
    chunk = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    start = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[start : start + 4])[0]
    (images / "bad.png").write_bytes(good[:start] + chunk + good[start + 12 + length :])
    (images / "dir.png").mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(good)
    rows = [
        {"prompt": "q", "answer": "a", "image": "ok.png"},
        {"prompt": "q", "answer": "a", "image": "bad.png"},
        {"prompt": "q", "answer": "a", "image": "../secret.png"},
        {"prompt": "q", "answer": "a", "image": "dir.png"},
        {"prompt": "q", "answer": "a", "image": 5},
    ]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"prompt": "\xff"}\n')
    report = formats.load_chat_jsonl(data, image_folder=images)
    assert [e.image.name for e in report.examples] == ["ok.png"]
    reasons = [b.reason for b in report.skipped]
    assert "unreadable" in reasons[0] and "outside the image folder" in reasons[1]
    assert "is a folder, not an image file" in reasons[2] and "must be a file path" in reasons[3]
    assert "not UTF-8" in reasons[4] and report.skipped[4].row == 6


def test_cli_batches_are_collated_lazily(toy_dir):
    from skipvlm.cli.loading import Batches

    calls = []
    batches = Batches(list(range(10)), lambda ex: calls.append(ex) or ex, 4)
    assert len(batches) == 3 and calls == []
    assert batches[2] == [8, 9] and calls == [[8, 9]]
    with pytest.raises(IndexError):
        batches[3]


def test_scienceqa_bad_rows_and_bad_splits(tmp_path):
    from skipvlm.data import formats

    problems = {
        "1": {"question": "q", "choices": ["a", "b"], "answer": 0, "grade": "gradeX"},
        "2": {"question": "q", "choices": [str(i) for i in range(11)], "answer": 0, "grade": "grade3"},
        "3": {
            "question": "q",
            "choices": ["a", "b"],
            "answer": 1,
            "grade": "grade7",
            "subject": "language science",
        },
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "val": "1"}))
    report = formats.load_scienceqa(tmp_path / "problems.json", tmp_path / "splits.json", "test")
    assert [e.id for e in report.examples] == ["3"] and report.examples[0].meta["grade"] == 7
    assert "is not of the form 'grade7'" in report.skipped[0].reason
    assert "11 choices; at most 10" in report.skipped[1].reason
    with pytest.raises(ValueError, match="must be a list of problem ids"):
        formats.load_scienceqa(tmp_path / "problems.json", tmp_path / "splits.json", "val")


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_a_wrong_adapters_folder_fails_before_the_model_loads(
    toy_dir, tmp_path, capsys, monkeypatch, command
):
    no_load(monkeypatch)
    args = [command, "--model", str(toy_dir / "model"), "--adapters", str(tmp_path / "typo")]
    args += ["--out", str(tmp_path / "o")] if command == "merge" else ["--data", str(toy_dir / "test.jsonl")]
    assert main(args) == 2
    assert "cannot load EAS adapters from" in err_line(capsys)
