"""The tiny BridgeTower skipvlm pretrains itself: VQA by answer classification on the shapes world.

A real ``transformers`` BridgeTower (text encoder, ViT, co-attention layers) with METER's VQA head
(:class:`~skipvlm.encoders.heads.BridgeTowerForVQA`), the toy LLaVA's word-level tokenizer (right
padding, a ``<s>`` first token for the text pooler) and :class:`EncoderCollator`, which turns
:class:`~skipvlm.data.chat.ChatExample` s of :mod:`skipvlm.data.synthetic` into model batches (answer
index labels over :func:`answer_vocabulary`). Pretrained from scratch on
:data:`~skipvlm.toy.PRETRAIN_FAMILIES` and saved as a Hugging Face checkpoint with its tokenizer and
``pretrain.json`` (command, steps, time, validation accuracy per question family).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from skipvlm.data.chat import ChatExample
from skipvlm.data.synthetic import COLOURS, NUMBERS, SHAPES, SyntheticBatches, SyntheticTask, vocabulary
from skipvlm.encoders.heads import BridgeTowerForVQA
from skipvlm.toy import (
    DOWNSTREAM_FAMILIES,
    PRETRAIN_FAMILIES,
    build_tokenizer,
    pretrain_record,
    save_pretrained_toy,
)

__all__ = [
    "SHIPPED",
    "EncoderCollator",
    "EncoderToyConfig",
    "answer_vocabulary",
    "build_toy_bridgetower",
    "evaluate_vqa",
    "load_toy_bridgetower",
    "pretrain_bridgetower",
]

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent.parent / "assets" / "toy-bridgetower"
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]  # CLIP's, as BridgeTower's processor
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def answer_vocabulary() -> list[str]:
    """Every answer of the shapes world's question families: yes / no, colours, shapes, numbers and the
    sorted sets the ``colors`` / ``shapes`` questions answer with."""
    answers = ["yes", "no", *sorted(COLOURS), *SHAPES, *NUMBERS]
    for pool in (sorted(COLOURS), sorted(SHAPES)):
        for n in range(2, len(pool) + 1):
            answers += [" ".join(c) for c in itertools.combinations(pool, n)]
    return list(dict.fromkeys(answers))


@dataclass(frozen=True)
class EncoderToyConfig:
    """Shapes of the toy BridgeTower.

    Args:
        hidden_size / intermediate_size / num_heads: the text encoder and the co-attention layers.
        text_layers / vision_layers: the uni-modal encoders (the last ``co_layers - 1`` of each feed the
            co-attention layers through BridgeTower's bridges).
        co_layers: co-attention layers L (each with a text and an image stream).
        vision_hidden: the ViT width (BridgeTower's ViT has ``vision_hidden / 64`` heads).
        image_size / patch_size: (image_size / patch_size)^2 + 1 image tokens.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    text_layers: int = 3
    vision_layers: int = 3
    co_layers: int = 4
    vision_hidden: int = 64
    image_size: int = 48
    patch_size: int = 16


def build_toy_bridgetower(
    tokenizer: tf.PreTrainedTokenizerFast, config: EncoderToyConfig, seed: int = 0
) -> BridgeTowerForVQA:
    """A randomly initialised BridgeTower with a VQA head over :func:`answer_vocabulary`."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    answers = answer_vocabulary()
    bt = tf.BridgeTowerConfig(
        text_config=text,
        vision_config=vision,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.co_layers,
        num_attention_heads=config.num_heads,
        id2label=dict(enumerate(answers)),
    )
    torch.manual_seed(seed)
    return BridgeTowerForVQA(bt).eval()


class EncoderCollator:
    """ChatExamples -> a BridgeTower batch: ``input_ids`` / ``attention_mask`` of ``"<s> {prompt}"``
    (right padding), ``pixel_values`` (B, 3, S, S) normalised as CLIP, ``labels`` (B,) answer indices.

    Args:
        tokenizer: the word-level tokenizer (its ``<s>`` starts each text: the text pooler reads it).
        image_size: S.
        answers: the answer vocabulary (``config.id2label`` in order).

    Raises:
        ValueError: (on call) an answer outside the vocabulary.
    """

    def __init__(self, tokenizer: tf.PreTrainedTokenizerFast, image_size: int, answers: Sequence[str]):
        self.tokenizer, self.image_size = tokenizer, image_size
        self.answers = list(answers)
        self._index = {a: i for i, a in enumerate(self.answers)}
        self.tokenizer.padding_side = "right"

    def pixels(self, image: Any) -> torch.Tensor:
        """(3, S, S) normalised pixels of a PIL image."""
        image = image.convert("RGB").resize((self.image_size, self.image_size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(
            self.image_size, self.image_size, 3
        )
        return (x.permute(2, 0, 1).float() / 255 - _MEAN) / _STD

    def __call__(self, examples: Sequence[ChatExample], train: bool = True) -> dict[str, torch.Tensor]:
        texts = [f"{self.tokenizer.bos_token} {ex.prompt}" for ex in examples]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        batch = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": torch.stack([self.pixels(ex.image) for ex in examples]),
        }
        unknown = [ex.answer for ex in examples if ex.answer not in self._index]
        if unknown:
            raise ValueError(f"answers {unknown[:3]} are not in the answer vocabulary of this model")
        batch["labels"] = torch.tensor([self._index[ex.answer] for ex in examples])
        return batch


@torch.no_grad()
def evaluate_vqa(
    model: nn.Module, collator: EncoderCollator, examples: Sequence[ChatExample], batch_size: int = 50
) -> float:
    """Accuracy of the top answer over ``examples`` (the model is put in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        labels = batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        right += int((logits.argmax(-1).cpu() == labels).sum())
    return right / max(1, len(examples))


def load_toy_bridgetower(path: str | os.PathLike = SHIPPED) -> tuple[BridgeTowerForVQA, EncoderCollator]:
    """The toy BridgeTower at ``path`` (default: the shipped one) and its collator.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy BridgeTower at {path}; build one with "
            f"`skipvlm toy pretrain --host bridgetower --out {path}`"
        )
    # a local folder: weights from safetensors only, never code from it
    model = BridgeTowerForVQA.from_pretrained(path, use_safetensors=True, trust_remote_code=False).eval()
    tokenizer = tf.PreTrainedTokenizerFast.from_pretrained(path, trust_remote_code=False)
    answers = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return model, EncoderCollator(tokenizer, model.config.vision_config.image_size, answers)


def pretrain_bridgetower(
    out: str | os.PathLike,
    config: EncoderToyConfig | None = None,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    eval_examples: int = 150,
    progress: bool = True,
) -> dict:
    """Build the toy BridgeTower and train every parameter from scratch on the pretraining families.

    Returns:
        The ``pretrain.json`` content (also written to ``out`` with the checkpoint and tokenizer).
    """
    from skipvlm.train import TrainConfig, fit

    config = config or EncoderToyConfig()
    start = time.perf_counter()
    task = SyntheticTask(families=PRETRAIN_FAMILIES, image_size=config.image_size)
    tokenizer = build_tokenizer(vocabulary(task.grid))
    model = build_toy_bridgetower(tokenizer, config, seed)
    collator = EncoderCollator(tokenizer, config.image_size, answer_vocabulary())
    batches = SyntheticBatches(task, collator, steps, batch_size, "train", seed)
    cfg = TrainConfig(epochs=1, lr=lr, warmup_ratio=0.05, shuffle=False, seed=seed, progress=progress)
    history = fit(model, batches, cfg, name="pretrain")
    accuracy = {}
    for family in (*PRETRAIN_FAMILIES, *DOWNSTREAM_FAMILIES):
        examples = SyntheticTask(families=(family,), image_size=config.image_size).examples(
            eval_examples, "val", seed
        )
        accuracy[family] = evaluate_vqa(model, collator, examples)
    info = pretrain_record(model, history, start, seed, steps, batch_size, lr, asdict(config), accuracy)
    save_pretrained_toy(out, model, tokenizer, info)
    logger.info("pretrained the toy BridgeTower in %.0fs: %s", info["seconds"], accuracy)
    return info
