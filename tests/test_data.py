"""Chat examples in: JSONL loading with row-level errors, and the collator's labels, padding and images."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from skipvlm.data import ChatCollator, ChatExample, load_jsonl
from skipvlm.data.labels import IGNORE_INDEX
from skipvlm.evaluate import choice_index, evaluate, normalize_answer

from conftest import colour_examples, toy_parts


@pytest.fixture(scope="module")
def processor():
    return toy_parts()[1]


def test_ignore_index_is_the_label_the_losses_skip_by_default():
    default = inspect.signature(torch.nn.functional.cross_entropy).parameters["ignore_index"].default
    assert IGNORE_INDEX == default == torch.nn.CrossEntropyLoss().ignore_index


def test_collator_supervises_the_answer_only_and_left_pads(processor):
    examples = [*colour_examples(1), ChatExample("is the square red?", "red")]  # one with, one without image
    batch = ChatCollator(processor)(examples)
    tok = processor.tokenizer
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and batch["pixel_values"].shape[0] == 1
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((ids[0] == image_id).sum()) == 16 and int((ids[1] == image_id).sum()) == 0
    for row in range(2):
        supervised = labels[row][labels[row] != IGNORE_INDEX].tolist()
        answer = examples[row].answer
        assert supervised == [tok.convert_tokens_to_ids(answer), tok.eos_token_id]
        assert tok.decode(ids[row, -2:-1]) == answer
    assert mask[1, 0] == 0 and ids[1, 0] == tok.pad_token_id and labels[1, 0] == IGNORE_INDEX  # left padding
    assert mask[0].all()

    gen = ChatCollator(processor)(examples, train=False)
    assert "labels" not in gen and gen["input_ids"].shape[1] == ids.shape[1] - 2
    assert tok.decode(gen["input_ids"][0, -1:]) == ":"  # ends with the prompt


def test_collator_errors_name_the_example(processor, tmp_path):
    bad = ChatExample("what color?", "red", tmp_path / "missing.png", id="row-7")
    with pytest.raises(ValueError, match=r"example row-7: cannot read image"):
        ChatCollator(processor)([bad])
    with pytest.raises(ValueError, match=r"is \d+ tokens long, over max_length=5"):
        ChatCollator(processor, max_length=5)(colour_examples(1))


def test_load_jsonl_resolves_images_and_reports_bad_rows(tmp_path):
    (tmp_path / "pics").mkdir()
    colour_examples(1)[0].image.save(tmp_path / "pics" / "a.png")
    good = {
        "prompt": "what color is the square?",
        "answer": "red",
        "image": "a.png",
        "choices": ["red", "blue"],
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    rows = load_jsonl(path, image_folder=tmp_path / "pics")
    assert len(rows) == 2 and rows[0].image == tmp_path / "pics" / "a.png" and rows[1].image is None
    assert rows[0].choices == ["red", "blue"] and rows[1].id == "d.jsonl:3"

    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl row 2: the answer is empty"):
        load_jsonl(path, image_folder=tmp_path / "pics")
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"d\.jsonl row 1: not valid JSON"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_answer_normalisation_and_choice_parsing():
    assert normalize_answer("  The Red, square! ") == "red square"
    choices = ["red", "green", "blue"]
    assert choice_index("B", choices) == 1
    assert choice_index("(c).", choices) == 2
    assert choice_index("The answer is A.", choices) == 0
    assert choice_index("Blue", choices) == 2
    assert choice_index("purple", choices) is None
    assert choice_index("D", choices) is None


def test_evaluate_scores_greedy_answers(processor):
    model = toy_parts()[0]
    examples = colour_examples(5, seed=3)
    result = evaluate(
        model, ChatCollator(processor), examples, batch_size=2, max_new_tokens=3, progress=False
    )
    assert result.total == 5 and len(result.predictions) == 5
    assert result.correct == sum(p["correct"] for p in result.predictions)
    assert result.accuracy == pytest.approx(result.correct / 5)
    assert {p["id"] for p in result.predictions} == {e.id for e in examples}
    with pytest.raises(ValueError, match="no examples"):
        evaluate(model, ChatCollator(processor), [], progress=False)


def test_evaluate_counts_a_known_answer_as_correct(processor, monkeypatch):
    examples = colour_examples(4, seed=1)
    model = toy_parts()[0]
    import skipvlm.evaluate as ev

    monkeypatch.setattr(ev, "generate_answers", lambda *a, **k: [examples[0].answer, "purple", "B", "x"])
    result = evaluate(model, ChatCollator(processor), examples, progress=False)
    expected = [True, False, examples[2].answer == "green", False]
    assert [p["correct"] for p in result.predictions] == expected
    assert isinstance(result.to_dict()["accuracy"], float)
    assert torch.tensor(result.accuracy) == sum(expected) / 4
