"""Run by test_distributed.py under torchrun: a small search; every rank reports its bandit and adapters."""

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


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model, processor = toy_parts()
    collate = ChatCollator(processor)
    train_ex, held_ex = colour_examples(32, seed=0), colour_examples(8, seed=1)
    batches = [collate(train_ex[i : i + 4]) for i in range(0, 32, 4)]
    held = [collate(held_ex[i : i + 4]) for i in range(0, 8, 4)]
    config = skipvlm.SearchConfig(
        k=2, warmup_epochs=1, search_epochs=2, interval=1, train=skipvlm.TrainConfig(lr=1e-2, progress=False)
    )
    result = skipvlm.search(model, batches, held, config, out=out)
    rank = int(os.environ["RANK"])
    report = {
        "world": int(os.environ["WORLD_SIZE"]),
        "preferences": result.bandit.preferences.tolist(),
        "plan": result.plan.to_dict(),
        "adapter_sum": float(sum(v.double().abs().sum() for v in result.model.adapter_state_dict().values())),
        "updates": result.bandit.updates,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
