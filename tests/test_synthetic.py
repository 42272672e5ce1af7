"""The synthetic shapes task: deterministic, answers consistent with the boards, images drawn where said."""

from __future__ import annotations

import re

import pytest

from skipvlm.data.synthetic import COLOURS, FAMILIES, NUMBERS, SyntheticBatches, SyntheticTask, vocabulary


def test_examples_are_deterministic_per_seed_and_split():
    task = SyntheticTask()
    a, b = task.examples(12, "train", seed=3), task.examples(12, "train", seed=3)
    assert [(e.prompt, e.answer, e.image.tobytes()) for e in a] == [
        (e.prompt, e.answer, e.image.tobytes()) for e in b
    ]
    assert [e.prompt for e in task.examples(12, "test", seed=3)] != [e.prompt for e in a]
    assert task.example(7, "train", 3).prompt == a[7].prompt  # random access, any order
    with pytest.raises(ValueError, match="split must be one of"):
        task.examples(1, "dev")
    with pytest.raises(ValueError, match="unknown question families"):
        SyntheticTask(families=("colour",))


def _answer_from_objects(family: str, prompt: str, objects: list[dict]) -> str | None:
    colours = {o["colour"] for o in objects}
    words = prompt.split()
    if family == "colors":
        return " ".join(sorted(colours))
    if family == "anycolor":
        return "yes" if words[3] in colours else "no"
    if family == "nocolor":
        return "no" if words[3] in colours else "yes"
    if family == "bothcolors":
        return "yes" if words[3] in colours and words[7] in colours else "no"
    if family == "missing":
        return (set(COLOURS) - colours).pop()
    if family == "countall":
        return NUMBERS[len(objects)]
    if family == "count":
        return NUMBERS[sum(o["colour"] == words[2] for o in objects)]
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_agree_with_the_board(family):
    for ex in SyntheticTask(families=(family,)).examples(40, "val"):
        assert ex.meta["family"] == family and ex.answer
        expected = _answer_from_objects(family, ex.prompt, ex.meta["objects"])
        if expected is not None:
            assert ex.answer == expected, (ex.prompt, ex.meta["objects"])


def test_yes_no_families_are_balanced():
    for family in ("anycolor", "nocolor", "bothcolors", "leftright"):
        answers = [e.answer for e in SyntheticTask(families=(family,)).examples(200)]
        assert 0.35 < answers.count("yes") / len(answers) < 0.65, family


def test_objects_are_drawn_in_their_cells_in_their_colours():
    task = SyntheticTask(image_size=48)
    for ex in task.examples(20):
        for o in ex.meta["objects"]:
            centre = (o["col"] * 16 + 8, o["row"] * 16 + 10)  # lower middle: inside every shape
            assert ex.image.getpixel(centre) == COLOURS[o["colour"]]
        occupied = {(o["row"], o["col"]) for o in ex.meta["objects"]}
        empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in occupied]
        for r, c in empty:
            assert ex.image.getpixel((c * 16 + 8, r * 16 + 8)) == (0, 0, 0)


def test_vocabulary_covers_every_prompt_and_answer():
    words = set(vocabulary())
    for family in FAMILIES:
        for ex in SyntheticTask(families=(family,)).examples(30):
            tokens = re.findall(r"\w+|[^\w\s]", f"user : {ex.prompt} assistant : {ex.answer}".lower())
            assert set(tokens) <= words, family


def test_batches_are_built_on_access():
    calls = []

    def collate(examples):
        calls.append(len(examples))
        return {"n": len(examples), "first": examples[0].id}

    batches = SyntheticBatches(SyntheticTask(), collate, num_batches=5, batch_size=4)
    assert len(batches) == 5 and calls == []
    assert batches[2]["first"] == "train-0-8" and calls == [4]
    with pytest.raises(IndexError):
        batches[5]
