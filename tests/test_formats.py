"""Real formats in (LLaVA, ScienceQA, HF datasets) with bad rows of every kind; scores out; robustness."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import skipvlm
from skipvlm.cli import main
from skipvlm.data.formats import BadRowError, load_hf_dataset, load_llava, load_scienceqa
from skipvlm.scoring import score_scienceqa, vqa_match, vqa_normalize

from conftest import colour_examples, toy_parts


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    return folder


# --- LLaVA ---------------------------------------------------------------------------------------------


def _conv(q, a, image=None, **extra):
    row = {
        "id": extra.pop("id", q),
        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
    }
    if image:
        row["image"] = image
    return {**row, **extra}


def test_llava_json_with_bad_rows_of_every_kind(tmp_path, images):
    rows = [
        _conv("what color?", "red", "good.png", id="ok"),  # 0
        {"id": "no-conv", "image": "good.png"},  # 1 missing field
        _conv("what color?", "red", "missing.png", id="no-image"),  # 2 missing image
        _conv("what color?", "red", "corrupt.png", id="bad-image"),  # 3 corrupt image
        _conv("what color?", "   ", "good.png", id="empty"),  # 4 empty answer
        _conv("x" * 500, "red", None, id="long"),  # 5 over-long
        {
            "id": "multi",
            "image": "good.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "and the size?"},
                {"from": "gpt", "value": "small"},
            ],
        },  # 6 multi-turn
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    report = load_llava(path, image_folder=images, max_chars=300)
    assert [e.id for e in report.examples] == ["ok", "multi"]
    assert [(b.row, b.reason.split(" ")[0]) for b in report.skipped] == [
        (1, "field"), (2, "image"), (3, "image"), (4, "the"), (5, "the"),
    ]  # fmt: skip
    assert "does not exist" in report.skipped[1].reason and "unreadable" in report.skipped[2].reason
    multi = report.examples[1]
    assert multi.prompt == "what color? ASSISTANT: red USER: and the size?" and multi.answer == "small"
    assert "<image>" not in multi.prompt and multi.image == images / "good.png"
    assert "skipped 5 bad rows" in report.summary() and f"{path} row 3" in report.summary()
    with pytest.raises(BadRowError, match=r"data\.json row 1: field 'conversations'"):
        load_llava(path, image_folder=images, on_bad_row="fail")


def test_llava_jsonl_reports_line_numbers(tmp_path, images):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(_conv("q", "a", "good.png")) + "\n\n{broken\n" + json.dumps(_conv("q", "b")) + "\n"
    )
    report = load_llava(path, image_folder=images)
    assert (
        len(report.examples) == 2
        and report.skipped[0].row == 3
        and "not valid JSON" in report.skipped[0].reason
    )


# --- ScienceQA ----------------------------------------------------------------------------------------------


def _scienceqa(tmp_path, images):
    def problem(question, choices, answer, subject, grade, **extra):
        return {
            "question": question,
            "choices": choices,
            "answer": answer,
            "subject": subject,
            "grade": grade,
            **extra,
        }

    problems = {
        "1": problem(
            "Which is a mammal?",
            ["cat", "fish"],
            0,
            "natural science",
            "grade3",
            hint="",
            lecture="L1",
            solution="S1",
        ),
        "2": problem(
            "Capital?",
            ["Rome", "Oslo", "Lima"],
            2,
            "social science",
            "grade8",
            hint="A map.",
            image="image.png",
        ),
        "3": problem(
            "Which word rhymes?", ["cat", "dog"], 1, "language science", "grade10", hint="Text here."
        ),
        "4": problem("Bad answer", ["a", "b"], 5, "natural science", "grade1"),
        "5": problem("Missing image", ["a", "b"], 0, "natural science", "grade2", image="image.png"),
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(
        json.dumps({"test": ["1", "2", "3", "4", "5", "6"], "train": ["1"]})
    )
    (images / "test" / "2").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(images / "test" / "2" / "image.png")
    return load_scienceqa(tmp_path / "problems.json", tmp_path / "pid_splits.json", "test", images)


def test_scienceqa_loads_prompts_and_reports_bad_rows(tmp_path, images):
    report = _scienceqa(tmp_path, images)
    assert [e.id for e in report.examples] == ["1", "2", "3"]
    reasons = [b.reason for b in report.skipped]
    assert (
        "answer index 5" in reasons[0]
        and "does not exist" in reasons[1]
        and "missing from problems" in reasons[2]
    )
    assert [b.row for b in report.skipped] == ["4", "5", "6"]
    first = report.examples[0]
    assert first.prompt.startswith("Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) fish")
    assert first.answer == "The answer is A." and first.choices == ["A", "B"]
    ale = load_scienceqa(
        tmp_path / "problems.json", tmp_path / "pid_splits.json", "test", images, fmt="QCM-ALE"
    )
    assert ale.examples[0].answer == "The answer is A. BECAUSE: L1 S1"


def test_scienceqa_scoring_reproduces_hand_computed_columns(tmp_path, images):
    examples = _scienceqa(tmp_path, images).examples
    # 1 (NAT, NO, G1-6): right; 2 (SOC, TXT+IMG, G7-12): wrong letter; 3 (LAN, TXT, G7-12): unparseable
    scores = score_scienceqa(examples, ["The answer is A.", "(B)", "I think it rhymes"])
    acc = scores["accuracy"]
    assert acc["NAT"] == 100 and acc["SOC"] == 0 and acc["LAN"] == 0
    assert acc["TXT"] == 0 and acc["IMG"] == 0 and acc["NO"] == 100
    assert acc["G1-6"] == 100 and acc["G7-12"] == 0 and acc["Avg"] == pytest.approx(100 / 3)
    assert scores["counts"]["TXT"] == 2 and scores["predictions"][2]["parsed"] is None


def test_vqa_normalisation():
    assert (
        vqa_normalize("Two dogs!") == "2 dogs"
        and vqa_match("the Cat.", "cat")
        and not vqa_match("cats", "cat")
    )


# --- Hugging Face datasets ------------------------------------------------------------------------------


def test_hf_save_to_disk_and_parquet_with_configurable_columns(tmp_path):
    import datasets

    good = Image.new("RGB", (16, 16), (0, 200, 0))
    data = datasets.Dataset.from_dict(
        {"img": [good, good, None], "q": ["what color?", "", "any?"], "a": ["green", "green", ""]},
        features=datasets.Features(
            {"img": datasets.Image(), "q": datasets.Value("string"), "a": datasets.Value("string")}
        ),
    )
    data.save_to_disk(str(tmp_path / "disk"))
    data.to_parquet(str(tmp_path / "data.parquet"))
    for path in (tmp_path / "disk", tmp_path / "data.parquet"):
        report = load_hf_dataset(path, image_column="img", question_column="q", answer_column="a")
        assert len(report.examples) == 1 and report.examples[0].answer == "green"
        assert [(b.row, b.reason) for b in report.skipped] == [
            (1, "column 'q' is empty"),
            (2, "the answer is empty"),
        ]
    with pytest.raises(ValueError, match=r"has no column\(s\) \['question', 'answer'\]"):
        load_hf_dataset(tmp_path / "disk")


# --- the CLI on real formats ------------------------------------------------------------------------------


def test_eval_cli_scores_scienceqa_by_column(toy_dir, tmp_path, images, capsys):
    _scienceqa(tmp_path, images)
    args = [
        "eval",
        "--model",
        str(toy_dir / "model"),
        "--format",
        "scienceqa",
        "--data",
        str(tmp_path / "problems.json"),
    ]
    args += [
        "--scienceqa-splits",
        str(tmp_path / "pid_splits.json"),
        "--image-folder",
        str(images),
        "--out",
        str(tmp_path / "out"),
    ]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "NAT" in captured.out and "G7-12" in captured.out and "skipped 3 bad rows" in captured.err
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert len(data["predictions"]) == 3 and set(data["accuracy"]) >= {"NAT", "IMG", "Avg"}
    assert main([*args, "--on-bad-row", "fail"]) == 2
    assert "row 4: answer index 5" in capsys.readouterr().err


# --- robustness -----------------------------------------------------------------------------------------


def _batches():
    model, processor = toy_parts()
    collate = skipvlm.data.ChatCollator(processor)
    examples = colour_examples(16)
    return model, [collate(examples[i : i + 4]) for i in range(0, 16, 4)]


def test_a_crash_during_a_checkpoint_save_leaves_the_last_good_one(tmp_path, monkeypatch):
    from skipvlm import train_loop as train_module

    config = skipvlm.TrainConfig(epochs=2, lr=1e-2, checkpoint_every=2, progress=False, calibrate=False)
    eas = skipvlm.EASConfig(skip_attention=[1])
    real_save = train_module.save_file
    calls = []

    def crashing_save(tensors, filename, *a, **k):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint dies halfway through writing its tensors
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt("killed during save")
        return real_save(tensors, filename, *a, **k)

    monkeypatch.setattr(train_module, "save_file", crashing_save)
    model, batches = _batches()
    with pytest.raises(KeyboardInterrupt):
        skipvlm.train(model, batches, config, eas=eas, out=tmp_path)
    monkeypatch.setattr(train_module, "save_file", real_save)
    state = json.loads((tmp_path / "train_checkpoint" / "state.json").read_text())
    assert state["step"] == 2  # the first checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["train_checkpoint"]  # no half-written folder left
    model, batches = _batches()
    resumed = skipvlm.train(model, batches, config, eas=eas, out=tmp_path, resume=True)
    model, batches = _batches()
    full = skipvlm.train(model, batches, config, eas=eas)
    for k, v in full.adapter_state_dict().items():
        torch.testing.assert_close(resumed.adapter_state_dict()[k], v, rtol=0, atol=0)


def test_out_of_memory_names_the_batch_and_the_fix(monkeypatch):
    model, batches = _batches()
    eas_model = skipvlm.get_eas_model(model, skipvlm.EASConfig())

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(eas_model.base_model, "forward", oom)
    with pytest.raises(RuntimeError, match=r"out of memory on a batch of shape \(4, \d+\).*grad-accum"):
        skipvlm.train(eas_model, batches, skipvlm.TrainConfig(epochs=1, progress=False))


def test_pickled_checkpoints_are_refused(tmp_path):
    model, _ = toy_parts()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"):
        skipvlm.load_pretrained(tmp_path)


def test_chat_jsonl_reports_bad_rows_by_line(tmp_path, images):
    from skipvlm.data.formats import load_chat_jsonl

    rows = [
        {"prompt": "what color?", "answer": "red", "image": "good.png"},
        {"prompt": "what color?", "answer": "red", "image": "corrupt.png"},
        {"answer": "red"},
        {"prompt": "what color?", "answer": ""},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = load_chat_jsonl(path, image_folder=images)
    assert len(report.examples) == 1 and [b.row for b in report.skipped] == [2, 3, 4]
    assert "unreadable" in report.skipped[0].reason and "prompt" in report.skipped[1].reason
