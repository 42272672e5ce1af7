"""Chat-style examples (prompt, optional image, answer) and the collator that builds model batches.

The collator runs the model's own processor (or tokenizer, for text-only models), so image tokens are
expanded exactly as the checkpoint expects, and lays the prompt out with the model's own chat template
(``apply_chat_template``) when the processor or tokenizer has one; ``prompt_format`` picks a custom
layout instead, and a model without a template falls back to :data:`LEGACY_FORMAT` with a warning.
Training batches supervise the answer only (the prompt and padding are
:data:`~skipvlm.data.labels.IGNORE_INDEX` in the labels, which is also how the adapters find the
prompt to pool); generation batches hold the prompt only. Both are left-padded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from skipvlm.data.labels import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "LEGACY_FORMAT", "ChatCollator", "ChatExample", "load_processor"]

logger = logging.getLogger(__name__)

# LLaVA-1.5's conversation layout, used for models that ship no chat template.
LEGACY_FORMAT = "USER: {image}{prompt} ASSISTANT:"

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

    folder = Path(path)
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "vocab.json",
        "processor_config.json",
    )
    if folder.is_dir() and not any((folder / n).is_file() for n in names):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer or processor files; save them beside the weights "
            "(processor.save_pretrained(folder); EASModel.export_merged and `skipvlm merge` do it)"
        )
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


def template_owner(processor: Any) -> Any | None:
    """The object whose ``apply_chat_template`` renders prompts (processor first), or None."""
    tokenizer = getattr(processor, "tokenizer", processor)
    for owner in (processor, tokenizer):
        if getattr(owner, "chat_template", None) and hasattr(owner, "apply_chat_template"):
            return owner
    return None


class ChatCollator:
    """Turns a list of :class:`ChatExample` into a left-padded, model-ready batch.

    Args:
        processor: the model's processor (``LlavaProcessor``, ``Qwen2VLProcessor``, ...) or tokenizer.
        prompt_format: a custom prompt layout, or None (default) for the model's own chat template.
            In a custom layout ``{image}`` becomes the image placeholder (plus a newline) for examples
            with an image and nothing otherwise, and ``{prompt}`` the prompt text. A processor without
            a chat template uses :data:`LEGACY_FORMAT` (with a warning).
        max_length: longest allowed sequence (prompt + answer); longer examples raise.
        image_token: the placeholder the processor expands (default: the processor's ``image_token``).
    """

    def __init__(
        self,
        processor: Any,
        prompt_format: str | None = None,
        max_length: int | None = None,
        image_token: str | None = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.image_token = image_token or getattr(processor, "image_token", None)
        self._owner = template_owner(processor) if prompt_format is None else None
        if prompt_format is None and self._owner is None:
            logger.warning(
                "%s has no chat template; prompts use %r (pass prompt_format / --prompt-format to choose)",
                type(processor).__name__,
                LEGACY_FORMAT,
            )
            prompt_format = LEGACY_FORMAT
        if prompt_format is not None and "{prompt}" not in prompt_format:
            raise ValueError(f"prompt_format {prompt_format!r} has no {{prompt}} field for the question")
        self.prompt_format = prompt_format
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template that builds the prompts, or None under a ``prompt_format``."""
        return self._owner.chat_template if self._owner is not None else None

    @property
    def template(self) -> str:
        """Which layout builds the prompts: ``"chat template"`` or ``"prompt format '<format>'"``."""
        if self._owner is not None:
            return f"the chat template of the {type(self._owner).__name__}"
        return f"prompt format {self.prompt_format!r}"

    def prompt_text(self, example: ChatExample) -> str:
        if example.image is not None and self.image_token is None and self._owner is None:
            raise ValueError(f"example {example.id} has an image but the processor has no image token")
        if self._owner is None:
            image = f"{self.image_token}\n" if example.image is not None else ""
            return self.prompt_format.format(image=image, prompt=example.prompt)
        if example.image is None and self._owner is self.tokenizer:
            content: Any = example.prompt  # text-only templates take a plain string
        else:
            content = [{"type": "image"}] if example.image is not None else []
            content = [*content, {"type": "text", "text": example.prompt}]
        messages = [{"role": "user", "content": content}]
        return self._owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode_prompt(self, example: ChatExample) -> dict[str, torch.Tensor]:
        text = self.prompt_text(example)
        # A chat template writes its own special tokens (e.g. BOS); the tokenizer must not add more.
        special = self._owner is None
        if example.image is None:
            return dict(self.tokenizer([text], return_tensors="pt", add_special_tokens=special))
        return dict(
            self.processor(
                text=[text], images=[_open_image(example)], return_tensors="pt", add_special_tokens=special
            )
        )

    def answer_ids(self, answer: str, after: str = " ") -> list[int]:
        """The answer's token ids followed by the end-of-sequence token; ``after`` is the prompt text it
        follows (a space separates them unless the prompt ends in white space, as chat templates do)."""
        sep = "" if after[-1:].isspace() else " "
        ids = self.tokenizer(sep + answer.strip(), add_special_tokens=False)["input_ids"]
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
                answer = torch.tensor([self.answer_ids(ex.answer, after=self.prompt_text(ex))])
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
