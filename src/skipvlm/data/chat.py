"""Chat-style examples (prompt, optional image, answer) and the collator that builds model batches.

The collator runs the model's own processor (or tokenizer, for text-only models), so image tokens are
expanded exactly as the checkpoint expects. Training batches supervise the answer only (the prompt
and padding are ``-100`` in the labels, which is also how the adapters find the prompt to pool);
generation batches hold the prompt only. Both are left-padded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

__all__ = ["IGNORE_INDEX", "ChatCollator", "ChatExample", "load_processor"]

IGNORE_INDEX = -100
# Token-aligned processor outputs: padded like input_ids. Everything else is concatenated on dim 0.
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class ChatExample:
    """One example: a user prompt, an optional image, the reference answer.

    Args:
        prompt: the user's text (no template; the collator adds it).
        answer: the reference answer text.
        image: a path (str / Path) or a PIL image, or ``None`` for a text-only example.
        choices: answer options for multiple-choice scoring.
        id: an identifier used in error messages and predictions.
    """

    prompt: str
    answer: str
    image: str | os.PathLike | Image.Image | None = None
    choices: list[str] | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def load_processor(path: str | os.PathLike) -> Any:
    """The processor saved with a local checkpoint (tokenizer only for a text-only model); no remote code."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _open_image(example: ChatExample) -> Image.Image:
    image = example.image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"example {example.id}: cannot read image {image} ({err})") from err


class ChatCollator:
    """Turns a list of :class:`ChatExample` into a left-padded, model-ready batch.

    Args:
        processor: the model's processor (``LlavaProcessor``, ``Qwen2VLProcessor``, ...) or tokenizer.
        prompt_format: how the prompt is laid out; ``{image}`` becomes the image placeholder (plus a
            newline) for examples with an image and nothing otherwise, ``{prompt}`` the prompt text.
        max_length: longest allowed sequence (prompt + answer); longer examples raise.
        image_token: the placeholder the processor expands (default: the processor's ``image_token``).
    """

    def __init__(
        self,
        processor: Any,
        prompt_format: str = "USER: {image}{prompt} ASSISTANT:",
        max_length: int | None = None,
        image_token: str | None = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.image_token = image_token or getattr(processor, "image_token", None)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")

    def prompt_text(self, example: ChatExample) -> str:
        if example.image is not None and self.image_token is None:
            raise ValueError(f"example {example.id} has an image but the processor has no image token")
        image = f"{self.image_token}\n" if example.image is not None else ""
        return self.prompt_format.format(image=image, prompt=example.prompt)

    def _encode_prompt(self, example: ChatExample) -> dict[str, torch.Tensor]:
        text = self.prompt_text(example)
        if example.image is None:
            return dict(self.tokenizer([text], return_tensors="pt"))
        return dict(self.processor(text=[text], images=[_open_image(example)], return_tensors="pt"))

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's token ids followed by the end-of-sequence token."""
        ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return list(ids) + ([eos] if eos is not None else [])

    def __call__(self, examples: Sequence[ChatExample], train: bool = True) -> dict[str, torch.Tensor]:
        """A batch; with ``train`` the answers are appended and supervised, otherwise prompts only."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows = []
        for ex in examples:
            enc = self._encode_prompt(ex)
            prompt_len = enc["input_ids"].shape[1]
            if train:
                answer = torch.tensor([self.answer_ids(ex.answer)])
                for key in _TOKEN_KEYS:
                    if key in enc:
                        fill = 1 if key == "attention_mask" else 0
                        extra = answer if key == "input_ids" else torch.full_like(answer, fill)
                        enc[key] = torch.cat([enc[key], extra.to(enc[key].dtype)], dim=1)
                labels = enc["input_ids"].clone()
                labels[:, :prompt_len] = IGNORE_INDEX
                enc["labels"] = labels
            length = enc["input_ids"].shape[1]
            if self.max_length is not None and length > self.max_length:
                raise ValueError(
                    f"example {ex.id} is {length} tokens long, over max_length={self.max_length}; shorten "
                    "it or raise max_length"
                )
            rows.append(enc)
        return _left_pad(rows, self.tokenizer.pad_token_id)


def _left_pad(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(r["input_ids"].shape[1] for r in rows)
    batch: dict[str, torch.Tensor] = {}
    keys = sorted({k for r in rows for k in r})
    for key in keys:
        if key in (*_TOKEN_KEYS, "labels"):
            fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}.get(key, 0)
            padded = []
            for r in rows:
                t = r[key]
                pad = torch.full((1, width - t.shape[1]), fill, dtype=t.dtype)
                padded.append(torch.cat([pad, t], dim=1))
            batch[key] = torch.cat(padded, dim=0)
        else:  # images: pixel values, grids ... only from the rows that have them
            parts = [r[key] for r in rows if key in r]
            batch[key] = torch.cat(parts, dim=0)
    return batch
