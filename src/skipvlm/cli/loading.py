"""What the ``skipvlm`` commands load from their options: the device, a checkpoint (checked before its
weights load), adapters, data files and the collator that batches them."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def device(args: argparse.Namespace) -> Any:
    """The torch device of ``--device`` (checked), else the local rank's GPU, else the CPU."""
    import torch

    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- checkpoints --------------------------------------------------------------------------------------------


def check_model_dir(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise FileNotFoundError(f"model folder {folder} {what}; pass a locally saved Hugging Face checkpoint")
    return folder


def check_adapters_dir(path: str) -> None:
    """Read an adapters folder's config (no weights), so a wrong path fails before the model loads."""
    from skipvlm.eas import _read_meta

    _read_meta(Path(path))


def model_config(folder: Path) -> Any:
    """The checkpoint's config.json as a transformers config (no remote code)."""
    import transformers

    return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)


def model_facts(folder: Path) -> Any:
    """Architecture facts from config.json alone, to validate settings before loading any weights."""
    from skipvlm.arch import arch_facts

    return arch_facts(model_config(folder))


def max_positions(folder: Path) -> int | None:
    """The longest sequence the checkpoint's text model has position embeddings for."""
    return getattr(model_config(folder).get_text_config(), "max_position_embeddings", None)


def load_model(folder: Path, args: argparse.Namespace) -> Any:
    """The checkpoint in ``folder`` in ``--dtype`` on the device, in eval mode."""
    import torch

    from skipvlm.export import load_pretrained

    dtype = getattr(torch, args.dtype)  # the --dtype choices are torch dtype names
    allow = getattr(args, "allow_missing_weights", False)
    return load_pretrained(folder, allow_missing_weights=allow, dtype=dtype).to(device(args)).eval()


# --- data ---------------------------------------------------------------------------------------------------


class Batches(Sequence):
    """Batches collated when they are read, so memory does not grow with the data set."""

    def __init__(self, examples: list, collator: Any, batch_size: int):
        self.examples, self.collator, self.batch_size = examples, collator, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.collator(self.examples[i * self.batch_size : (i + 1) * self.batch_size])


def data(args: argparse.Namespace, attr: str) -> list:
    """Examples from the data file of ``--<attr>`` in ``--format``; bad rows reported (and skipped)."""
    from skipvlm.data import formats

    path = getattr(args, attr)
    common = {"on_bad_row": args.on_bad_row, "max_chars": args.max_chars}
    if args.format == "jsonl":
        report = formats.load_chat_jsonl(path, image_folder=args.image_folder, **common)
    elif args.format == "llava":
        report = formats.load_llava(path, image_folder=args.image_folder, **common)
    elif args.format == "scienceqa":
        if not args.scienceqa_splits:
            raise ValueError("--format scienceqa needs --scienceqa-splits pid_splits.json")
        split = {"train": "train", "heldout": "val", "data": "test"}[attr] if not args.split else args.split
        report = formats.load_scienceqa(
            path, args.scienceqa_splits, split, args.image_folder, fmt=args.scienceqa_format, **common
        )
    else:
        report = formats.load_hf_dataset(
            path,
            split=args.split,
            image_column=args.image_column,
            question_column=args.question_column,
            answer_column=args.answer_column,
            choices_column=args.choices_column,
            **common,
        )
    print(report.summary(), file=sys.stderr)
    if not report.examples:
        raise ValueError(f"{path}: no usable examples")
    return report.examples


def data_fingerprint(*paths: str | None) -> str:
    """A digest of the data files (content), so that a resumed run refuses other data."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        if p.is_file():
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(p.resolve()).encode())
    return digest.hexdigest()[:16]


def collator(folder: Path, args: argparse.Namespace) -> Any:
    """The chat collator of the checkpoint's processor, with ``--prompt-format`` and ``--max-length``."""
    from skipvlm.data import ChatCollator, load_processor

    limit = max_positions(folder)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's {limit} positions; lower it")
    made = ChatCollator(
        load_processor(folder), prompt_format=args.prompt_format, max_length=args.max_length or limit
    )
    print(f"prompts are built with {made.template}", file=sys.stderr)
    return made


def record_prompt(out: str | None, collator: Any) -> None:
    """Write which prompt layout the run used into ``out/prompt.json`` (rank 0)."""
    from skipvlm.io import atomic_write_text

    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return
    layout = {
        "template": collator.template,
        "prompt_format": collator.prompt_format,
        "chat_template": collator.chat_template,
    }
    atomic_write_text(Path(out) / "prompt.json", json.dumps(layout, indent=1) + "\n")
