"""The tiny multimodal model skipvlm builds itself: a word-level tokenizer, a PIL image processor and a
real ``LlavaForConditionalGeneration`` (CLIP-style tower + Llama text model), saved together as a normal
Hugging Face checkpoint with a ``LlavaProcessor``, so that everything downstream (loading, collating,
search, merging, export) goes through the same code path as a real checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from skipvlm.io import atomic_files
from skipvlm.runinfo import run_info

__all__ = [
    "CHAT_TEMPLATE",
    "DOWNSTREAM_FAMILIES",
    "PRETRAIN_FAMILIES",
    "SHIPPED",
    "SPECIAL_TOKENS",
    "ToyConfig",
    "build_processor",
    "build_tokenizer",
    "build_toy_model",
    "load_toy",
    "pretrain",
    "save_toy",
    "write_task_data",
]

logger = logging.getLogger(__name__)

# The base model learns these question families; the demo's downstream task is the others.
PRETRAIN_FAMILIES = ("colors", "shapes", "colorat", "anycolor")
DOWNSTREAM_FAMILIES = ("nocolor", "bothcolors", "missing")
SHIPPED = Path(__file__).parent / "assets" / "toy-llava"  # the pretrained checkpoint in the repository

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# The toy's chat template: the one format it was pretrained on, ``USER: <image>\n{prompt} ASSISTANT:``
# (the collator's default prompt) followed by `` {answer}</s>``. A system message, if any, comes first,
# followed by a space. Saved with the processor as chat_template.jinja, so chat-style inputs (pipelines,
# lmms-eval's --apply_chat_template) render the prompt the model knows.
CHAT_TEMPLATE = """{#- skipvlm toy: "USER: <image>\\n{prompt} ASSISTANT: {answer}</s>", as in pretraining -#}
{%- for message in messages -%}
    {%- if message['content'] is string -%}
        {%- set body = message['content'] -%}
    {%- else -%}
        {%- set parts = namespace(text='') -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'image' -%}
                {%- set parts.text = parts.text + '<image>\\n' -%}
            {%- elif part['type'] == 'text' -%}
                {%- set parts.text = parts.text + part['text'] -%}
            {%- endif -%}
        {%- endfor -%}
        {%- set body = parts.text -%}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- 'USER: ' + body -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- ' ASSISTANT: ' + body + eos_token -}}
    {%- else -%}
        {{- body + ' ' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- ' ASSISTANT:' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class ToyConfig:
    """Shapes of the toy model.

    Args:
        hidden_size / intermediate_size / num_layers / num_heads: the Llama text model.
        vision_hidden / vision_layers: the CLIP-style vision tower.
        image_size / patch_size: images are resized to ``image_size`` square; (image_size / patch_size)^2
            visual tokens per image.
    """

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    vision_hidden: int = 64
    vision_layers: int = 2
    image_size: int = 48
    patch_size: int = 16

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(words: Iterable[str]) -> tf.PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over ``words`` (plus the special tokens), left-padding.

    Punctuation splits into its own tokens; unknown words map to ``<unk>``.
    """
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *(w.lower() for w in words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    # The image placeholder must split out of "<image><image>..." as the processor writes it.
    fast.add_tokens([tf.AddedToken(IMAGE, special=True, normalized=False)], special_tokens=True)
    return fast


def build_processor(tokenizer: tf.PreTrainedTokenizerFast, config: ToyConfig) -> tf.LlavaProcessor:
    """A ``LlavaProcessor`` with a PIL-based CLIP image processor at the toy's image size and the toy's
    chat template (:data:`CHAT_TEMPLATE`)."""
    size = config.image_size
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return tf.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",  # LLaVA-1.5's: the CLS token is dropped
        image_token=IMAGE,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_toy_model(
    tokenizer: tf.PreTrainedTokenizerFast, config: ToyConfig, seed: int = 0
) -> tf.LlavaForConditionalGeneration:
    """A randomly initialised LLaVA (CLIP-style tower + Llama) sized for ``tokenizer``'s vocabulary."""
    vision = tf.CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=2,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    llava = tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    llava.pad_token_id, llava.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(llava).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_toy(model: tf.PreTrainedModel, processor: tf.LlavaProcessor, path: str | os.PathLike) -> Path:
    """Save model and processor together as one Hugging Face checkpoint folder (atomically)."""
    with atomic_files(path) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(path)


def load_toy(path: str | os.PathLike = SHIPPED) -> tuple[tf.LlavaForConditionalGeneration, tf.LlavaProcessor]:
    """The toy checkpoint at ``path`` (default: the one shipped with skipvlm) and its processor.

    Raises:
        FileNotFoundError: there is no checkpoint at ``path`` (make one with ``skipvlm toy pretrain``).
    """
    from skipvlm.data.chat import load_processor
    from skipvlm.export import load_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no toy checkpoint at {path}; build one with `skipvlm toy pretrain --out {path}`"
        )
    return load_pretrained(path).eval(), load_processor(path)


def write_task_data(
    out: str | os.PathLike,
    sizes: dict[str, int] | None = None,
    families: tuple[str, ...] = DOWNSTREAM_FAMILIES,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the toy's synthetic task as skipvlm JSON lines: ``train.jsonl``, ``val.jsonl``,
    ``test.jsonl`` and their images under ``images/``, so the command line can be tried on the toy.

    Args:
        out: the folder to write.
        sizes: examples per split (default: 256 train, 64 val, 100 test).
        families: question families (default: the demo's downstream families).
        seed: the task seed.

    Returns:
        Split name -> the JSON-lines file.
    """
    from skipvlm.data.synthetic import SyntheticTask
    from skipvlm.io import atomic_path, atomic_write_text

    sizes = sizes or {"train": 256, "val": 64, "test": 100}
    task = SyntheticTask(families=tuple(families), image_size=ToyConfig().image_size)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in sizes.items():
        rows = []
        for ex in task.examples(n, split, seed):
            name = f"images/{ex.id}.png"
            with atomic_path(out / name) as tmp:
                ex.image.save(tmp, format="PNG")
            rows.append(json.dumps({"id": ex.id, "prompt": ex.prompt, "answer": ex.answer, "image": name}))
        files[split] = atomic_write_text(out / f"{split}.jsonl", "\n".join(rows) + "\n")
    return files


def pretrain(
    out: str | os.PathLike,
    config: ToyConfig | None = None,
    steps: int = 6000,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    eval_examples: int = 150,
    progress: bool = True,
) -> dict:
    """Build the toy LLaVA and train it from scratch on :data:`PRETRAIN_FAMILIES`; save it to ``out``.

    Every parameter trains (vision tower, projector, Llama). Deterministic for ``seed`` on one machine.
    The folder gets the checkpoint, its processor and ``pretrain.json`` (command, seed, settings, the
    validation accuracy per question family, pretraining and downstream, and
    :func:`~skipvlm.runinfo.run_info`).

    Returns:
        The ``pretrain.json`` content.
    """
    from skipvlm.data.chat import ChatCollator
    from skipvlm.data.synthetic import SyntheticBatches, SyntheticTask, vocabulary
    from skipvlm.evaluate import evaluate
    from skipvlm.train import TrainConfig, fit

    config = config or ToyConfig()
    start = time.perf_counter()
    task = SyntheticTask(families=PRETRAIN_FAMILIES, image_size=config.image_size)
    tokenizer = build_tokenizer(vocabulary(task.grid))
    processor = build_processor(tokenizer, config)
    model = build_toy_model(tokenizer, config, seed=seed)
    collator = ChatCollator(processor)
    batches = SyntheticBatches(task, collator, steps, batch_size, "train", seed)
    train_config = TrainConfig(
        epochs=1, lr=lr, warmup_ratio=0.05, shuffle=False, seed=seed, progress=progress
    )
    history = fit(model, batches, train_config, name="pretrain")
    accuracy = {}
    for family in (*PRETRAIN_FAMILIES, *DOWNSTREAM_FAMILIES):
        examples = SyntheticTask(families=(family,), image_size=config.image_size).examples(
            eval_examples, "val", seed
        )
        accuracy[family] = evaluate(
            model, collator, examples, batch_size=50, max_new_tokens=3, progress=False
        ).accuracy
    info = pretrain_record(model, history, start, seed, steps, batch_size, lr, asdict(config), accuracy)
    save_pretrained_toy(out, model, processor, info)
    logger.info("pretrained the toy model in %.0fs: %s", info["seconds"], accuracy)
    return info


def pretrain_record(
    model: torch.nn.Module,
    history: list[dict],
    start: float,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    config: dict,
    accuracy: dict[str, float],
) -> dict:
    """The ``pretrain.json`` of a toy pretrained from scratch: the command, its settings, the validation
    accuracy per question family, the final loss, the time since ``start`` and
    :func:`~skipvlm.runinfo.run_info`."""
    argv = sys.argv[1:]
    param = next(model.parameters())
    return {
        "command": "skipvlm " + " ".join(argv) if argv[:2] == ["toy", "pretrain"] else None,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "config": config,
        "pretrain_families": list(PRETRAIN_FAMILIES),
        "val_accuracy": accuracy,
        "final_loss": sum(h["loss"] for h in history[-50:]) / min(50, len(history)),
        "seconds": time.perf_counter() - start,
        **run_info(param.device, param.dtype),
    }


def save_pretrained_toy(out: str | os.PathLike, model: torch.nn.Module, processor: Any, info: dict) -> None:
    """Write the toy's checkpoint, its processor (or tokenizer) and ``pretrain.json`` to ``out``,
    atomically."""
    with atomic_files(out) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
