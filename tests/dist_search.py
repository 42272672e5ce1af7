"""Run by test_distributed.py under torchrun: a small search and a small training; every rank reports its
bandit, its adapters and every file it wrote to (an audit hook sees each open for writing, mkdir,
rename and removal under the output folder)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import skipvlm
from skipvlm.data import ChatCollator

from conftest import colour_examples, toy_parts

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def watch_writes(out: Path) -> list[str]:
    """Record every file-system change this process makes under ``out``."""
    seen: list[str] = []
    root = str(out.resolve())

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and under(path):
                seen.append(f"open {path}")
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree") and under(args[0]):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return seen


def data(n: int):
    model, processor = toy_parts()
    collate = ChatCollator(processor)
    train_ex, held_ex = colour_examples(n, seed=0), colour_examples(8, seed=1)
    batches = [collate(train_ex[i : i + 4]) for i in range(0, n, 4)]
    held = [collate(held_ex[i : i + 4]) for i in range(0, 8, 4)]
    return model, batches, held


def main(out: Path) -> None:
    torch.set_num_threads(1)
    writes = watch_writes(out)
    model, batches, held = data(32)
    config = skipvlm.SearchConfig(
        k=2, warmup_epochs=1, search_epochs=2, interval=1, train=skipvlm.TrainConfig(lr=1e-2, progress=False)
    )
    result = skipvlm.search(model, batches, held, config, out=out)
    # Data-parallel fine-tuning: 8 batches over 2 ranks; a single process with grad_accum=2 takes the
    # same optimiser steps.
    model, batches, _ = data(32)
    train_config = skipvlm.TrainConfig(epochs=1, lr=1e-2, checkpoint_every=2, progress=False)
    eas = skipvlm.EASConfig(skip_attention=[1, 2])
    skipvlm.train(model, batches, train_config, eas=eas, out=out / "train")
    rank = int(os.environ["RANK"])
    report = {
        "world": int(os.environ["WORLD_SIZE"]),
        "preferences": result.bandit.preferences.tolist(),
        "plan": result.plan.to_dict(),
        "adapter_sum": float(sum(v.double().abs().sum() for v in result.model.adapter_state_dict().values())),
        "updates": result.bandit.updates,
        "writes": list(writes),
    }
    (Path(os.environ["REPORT_DIR"]) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
