"""Benchmark scores against hand-computed numbers: ScienceQA's paper columns, VQA-style normalisation."""

from __future__ import annotations

import pytest

from skipvlm.data import ChatExample
from skipvlm.scoring import SCIENCEQA_COLUMNS, scienceqa_columns, score_scienceqa, vqa_match, vqa_normalize

SUBJECT = {"NAT": "natural science", "SOC": "social science", "LAN": "language science"}

# (subject, has text context, has image, grade, answer letter, prediction, counts as right)
ROWS = [
    ("NAT", False, False, 1, "A", "The answer is A.", True),  # 1: NO
    ("NAT", True, False, 6, "B", "B", True),  # 2: TXT
    ("NAT", False, True, 7, "C", "The answer is D.", False),  # 3: IMG only
    ("SOC", True, True, 12, "A", "(a)", True),  # 4: TXT and IMG
    ("SOC", False, False, 3, "B", "I think it is the second one", False),  # 5: NO, unparseable
    ("SOC", False, True, 9, "D", "The answer is E.", False),  # 6: IMG only; E is not an option
    ("LAN", True, False, 4, "C", "c", True),  # 7: TXT
    ("LAN", False, False, 8, "D", "The answer is D. BECAUSE: rhymes", True),  # 8: NO
]

# By hand: the examples in each column, and how many of them are right.
EXPECTED = {
    "NAT": (3, 2),  # 1 2 3
    "SOC": (3, 1),  # 4 5 6
    "LAN": (2, 2),  # 7 8
    "TXT": (3, 3),  # 2 4 7
    "IMG": (3, 1),  # 3 4 6
    "NO": (3, 2),  # 1 5 8 (neither text context nor image)
    "G1-6": (4, 3),  # 1 2 5 7 (grades 1 6 3 4)
    "G7-12": (4, 2),  # 3 4 6 8 (grades 7 12 9 8)
    "Avg": (8, 5),
}


def scienceqa_rows():
    examples, predictions = [], []
    for i, (subject, text, image, grade, letter, prediction, _) in enumerate(ROWS, 1):
        meta = {
            "subject": SUBJECT[subject],
            "grade": grade,
            "has_text_context": text,
            "has_image": image,
            "answer_letter": letter,
        }
        examples.append(
            ChatExample(f"question {i}", f"The answer is {letter}.", None, ["A", "B", "C", "D"], str(i), meta)
        )
        predictions.append(prediction)
    return examples, predictions


def test_scienceqa_every_column_matches_a_hand_count():
    examples, predictions = scienceqa_rows()
    scores = score_scienceqa(examples, predictions)
    assert set(scores["accuracy"]) == set(SCIENCEQA_COLUMNS)
    for column, (n, right) in EXPECTED.items():
        assert scores["counts"][column] == n, column
        assert scores["accuracy"][column] == pytest.approx(100 * right / n), column
    # The columns the test tells apart: a swap or a dropped condition changes at least one number.
    values = [scores["accuracy"][c] for c in ("NAT", "SOC", "LAN")]
    assert len(set(values)) == 3
    values = [scores["accuracy"][c] for c in ("TXT", "IMG", "NO")]
    assert len(set(values)) == 3
    assert [row["correct"] for row in scores["predictions"]] == [r[-1] for r in ROWS]
    assert [row["parsed"] for row in scores["predictions"]] == ["A", "B", "D", "A", None, None, "C", "D"]


def test_scienceqa_columns_of_single_examples():
    def cols(**meta):
        return scienceqa_columns(meta)

    assert cols(subject="Natural Science", grade=6) == ["NAT", "NO", "G1-6", "Avg"]
    assert cols(subject="social science", has_image=True, grade=7) == ["SOC", "IMG", "G7-12", "Avg"]
    assert cols(subject="language science", has_text_context=True, has_image=True, grade=12) == [
        "LAN", "TXT", "IMG", "G7-12", "Avg",
    ]  # fmt: skip
    assert cols(subject="art", grade=0) == ["NO", "Avg"]  # unknown subject, no grade: no such column


def test_scienceqa_empty_columns_are_none_and_lengths_must_match():
    examples, predictions = scienceqa_rows()
    scores = score_scienceqa(examples[:1], predictions[:1])
    assert scores["accuracy"]["NAT"] == 100 and scores["accuracy"]["SOC"] is None
    assert scores["counts"]["SOC"] == 0
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        score_scienceqa(examples[:2], predictions[:1])


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two dogs!", "2 dogs"),
        ("The answer: 3.5 meters.", "answer 3.5 meters"),
        ("A man's hat", "man 's hat"),
        ("None", "0"),
        ("It is 2.", "it is 2"),  # a sentence's period after a number goes too
        ("ten, eleven", "10 eleven"),
        ("an (old) red-ish car?", "old red ish car"),
    ],
)
def test_vqa_normalisation(text, normalised):
    assert vqa_normalize(text) == normalised


def test_vqa_match():
    assert vqa_match("the Cat.", "cat") and vqa_match("Two", "2") and vqa_match("3.5", "3.5.")
    assert not vqa_match("cats", "cat") and not vqa_match("35", "3.5") and not vqa_match("2 dogs", "dogs")
