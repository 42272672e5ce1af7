"""Accuracy from greedy generation: exact match and multiple choice.

A prediction is the greedy continuation of the prompt, decoded without special tokens. Exact match
compares normalised strings (lower case, punctuation and articles removed, spaces collapsed).
Multiple choice maps a prediction to an option by its letter (``A``, ``(b)``, ``The answer is C``) or
by its normalised text; a prediction that maps to no option is wrong, never guessed.
:func:`answer_loss` is the teacher-forced negative log-likelihood of the reference answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from skipvlm.data.chat import ChatCollator, ChatExample

__all__ = ["EvalResult", "answer_loss", "choice_index", "evaluate", "generate_answers", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_IS = re.compile(r"answer is\s*\(?([A-Za-z])\b", re.IGNORECASE)
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def choice_index(prediction: str, choices: Sequence[str]) -> int | None:
    """Which option a prediction names: a letter (``B``, ``(b).``, ``The answer is B``), else the option's
    normalised text; ``None`` if neither (an unparseable answer is wrong, not guessed)."""
    pred = prediction.strip()
    letter = _ANSWER_IS.search(pred) or _BARE_LETTER.fullmatch(pred)
    if letter:
        idx = ord(letter.group(1).upper()) - ord("A")
        return idx if 0 <= idx < len(choices) else None
    norm = normalize_answer(pred)
    for i, c in enumerate(choices):
        if normalize_answer(c) == norm:
            return i
    return None


@dataclass
class EvalResult:
    """Accuracy over examples, with every prediction."""

    accuracy: float
    correct: int
    total: int
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "predictions": self.predictions,
        }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    collator: ChatCollator,
    examples: Sequence[ChatExample],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy answers for ``examples``, decoded without special tokens, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for start in tqdm(
            range(0, len(examples), batch_size), desc="generating", disable=not progress, leave=False
        ):
            chunk = examples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collator(chunk, train=False).items()}
            ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, batch["input_ids"].shape[1] :]
            out += [collator.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    finally:
        model.train(was_training)
    return out


def evaluate(
    model: nn.Module,
    collator: ChatCollator,
    examples: Sequence[ChatExample],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
    metric: str = "exact",
) -> EvalResult:
    """Accuracy of greedy answers: multiple choice for examples with ``choices``, else ``metric``
    (``exact``: normalised exact match; ``vqa``: VQA-style normalisation, number words as digits).

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("evaluate() got no examples")
    answers = generate_answers(model, collator, examples, batch_size, max_new_tokens, progress)
    rows, correct = [], 0
    for ex, pred in zip(examples, answers, strict=True):
        if ex.choices:  # the option the prediction names must be the option the answer names
            picked = choice_index(pred, ex.choices)
            ok = picked is not None and picked == choice_index(ex.answer, ex.choices)
        elif metric == "vqa":
            from skipvlm.scoring import vqa_match

            ok = vqa_match(pred, ex.answer)
        else:
            ok = normalize_answer(pred) == normalize_answer(ex.answer)
        correct += ok
        rows.append({"id": ex.id, "prediction": pred, "answer": ex.answer, "correct": bool(ok)})
    return EvalResult(correct / len(examples), correct, len(examples), rows)


@torch.no_grad()
def answer_loss(
    model: nn.Module, collator: ChatCollator, examples: Sequence[ChatExample], batch_size: int = 8
) -> float:
    """Mean negative log-likelihood (nats per answer token) of the reference answers, teacher-forced.

    ``sum_b loss_b * n_b / sum_b n_b`` over batches ``b`` with ``n_b`` supervised (shifted) tokens: a
    finer, lower-variance measure than greedy accuracy, which scores each answer 0 or 1.

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("answer_loss() got no examples")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[start : start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            tokens += n
    finally:
        model.train(was_training)
    return total / max(tokens, 1)
