"""Benchmark scores: ScienceQA accuracy by the paper's columns, and VQA-style normalised matching.

ScienceQA (Lu et al., 2022) reports accuracy overall and by subject (NAT natural, SOC social, LAN
language science), by context modality (TXT text context, IMG image context, NO context) and by
grade (G1-6, G7-12). A prediction counts only if a letter can be read from it ("The answer is B.",
"B", "(b)"); an unparseable answer is wrong, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from skipvlm.data.chat import ChatExample
from skipvlm.evaluate import choice_index

__all__ = ["SCIENCEQA_COLUMNS", "scienceqa_columns", "score_scienceqa", "vqa_match", "vqa_normalize"]

SCIENCEQA_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:]")


def scienceqa_columns(meta: dict[str, Any]) -> list[str]:
    """The paper's columns an example counts in (always ``Avg``)."""
    cols = []
    subject = _SUBJECTS.get(str(meta.get("subject", "")).lower())
    if subject:
        cols.append(subject)
    if meta.get("has_text_context"):
        cols.append("TXT")
    if meta.get("has_image"):
        cols.append("IMG")
    if not meta.get("has_text_context") and not meta.get("has_image"):
        cols.append("NO")
    grade = int(meta.get("grade", 0))
    if 1 <= grade <= 6:
        cols.append("G1-6")
    elif grade >= 7:
        cols.append("G7-12")
    return [*cols, "Avg"]


def score_scienceqa(examples: Sequence[ChatExample], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy (%) per column and overall, with each example's parsed letter and verdict."""
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    totals = {c: [0, 0] for c in SCIENCEQA_COLUMNS}
    rows = []
    for ex, pred in zip(examples, predictions, strict=True):
        picked = choice_index(pred, ex.choices or [])
        letter = ex.choices[picked] if picked is not None else None
        ok = letter is not None and letter == ex.meta["answer_letter"]
        for col in scienceqa_columns(ex.meta):
            totals[col][0] += ok
            totals[col][1] += 1
        rows.append(
            {
                "id": ex.id,
                "prediction": pred,
                "parsed": letter,
                "answer": ex.meta["answer_letter"],
                "correct": ok,
            }
        )
    accuracy = {c: (100 * right / n if n else None) for c, (right, n) in totals.items()}
    return {"accuracy": accuracy, "counts": {c: n for c, (_, n) in totals.items()}, "predictions": rows}


def vqa_normalize(text: str) -> str:
    """VQA-style normalisation: lower case, no punctuation or articles, number words as digits."""
    text = _PUNCT.sub(" ", text.lower().replace("'s", " 's"))
    text = re.sub(r"\.(?!\d)", " ", text)  # a period ends a sentence unless a digit follows (3.5)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def vqa_match(prediction: str, answer: str) -> bool:
    """Whether a short answer matches the reference after :func:`vqa_normalize`."""
    return vqa_normalize(prediction) == vqa_normalize(answer)
