"""Recipes: the EAS paper's settings as named, documented presets of the EAS, training and search configs.

``shared/METHODS.md`` §2-§3 fix what PIA and the search compute; a recipe fixes the numbers a run uses
(bottleneck widths, dropout, learning rates, epochs, the bandit's cadence). Each value carries its
source: what the paper says, as far as issue 15 reports it (the paper text was not at hand to this
change, so other paper values are "not checked"), and what the official code (DoubtedSteam/EAS:
``LLaVA-EAS/`` and ``LaVIN-EAS/``, its scripts for ScienceQA) sets. A value neither source gives keeps
skipvlm's default, marked "not stated".

Settings a recipe cannot express, because skipvlm follows METHODS where the official code differs, are
listed in the sources too (e.g. the LLaVA code's sigmoid bandit policy scored on the training batch, its
separate projector learning rate, LaVIN's AdamW betas). ``k`` (how many modules to skip) is a property
of the model's depth and the run, not of a recipe: the paper skips 8 or 12 of 32 MHAs.

Use::

    recipe = skipvlm.get_recipe("llava-1.5")
    model = skipvlm.get_eas_model(base, dataclasses.replace(recipe.eas, skip_attention=[...]))
    skipvlm.train(model, batches, recipe.train)

or ``skipvlm train --recipe llava-1.5 ...`` (options given explicitly override the recipe).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from skipvlm.eas import EASConfig
from skipvlm.train import SearchConfig, TrainConfig

__all__ = ["RECIPES", "Recipe", "Source", "get_recipe", "recipe_names", "recipe_table"]


@dataclass(frozen=True)
class Source:
    """Where a recipe's value of one setting comes from.

    Args:
        paper: what the paper states (or ``"not checked"`` / ``"not stated"``).
        official: what the official code sets, with the file that sets it.
    """

    paper: str
    official: str


@dataclass(frozen=True)
class Recipe:
    """A named set of EAS, training and search settings.

    Args:
        name: the name :func:`get_recipe` and ``--recipe`` take.
        description: one line on what it reproduces.
        eas: the adapters (no skips: add them, or let a search find them).
        train: fine-tuning a fixed plan.
        search: the redundancy search (its ``train`` optimises the supernet).
        sources: per setting (``"eas.dropout"``, ``"train.lr"``, ``"search.interval"``, ...), where its
            value comes from; settings that differ from skipvlm's defaults all have one.
    """

    name: str
    description: str
    eas: EASConfig
    train: TrainConfig
    search: SearchConfig
    sources: dict[str, Source] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """The settings this recipe changes from skipvlm's defaults, by dotted name."""
        return {k: v for k, v in _flat(self).items() if v != _DEFAULTS.get(k)}


def _flat(recipe: Recipe) -> dict[str, Any]:
    out = {f"eas.{k}": v for k, v in dataclasses.asdict(recipe.eas).items()}
    out |= {f"train.{k}": v for k, v in dataclasses.asdict(recipe.train).items()}
    search = dataclasses.asdict(recipe.search)
    out |= {f"search.train.{k}": v for k, v in search.pop("train").items()}
    out |= {f"search.{k}": v for k, v in search.items()}
    return out


_BASE = Recipe("defaults", "skipvlm's defaults", EASConfig(), TrainConfig(), SearchConfig())
_DEFAULTS = _flat(_BASE)

# --- the official code, file by file (DoubtedSteam/EAS) -------------------------------------------------

_LLAVA_ADAPTER = "LLaVA-EAS/llava/train/pia_adapter.py"
_LLAVA_SEARCH = "LLaVA-EAS/scripts/search_sqa.sh"
_LLAVA_TUNE = "LLaVA-EAS/scripts/finetune_sqa.sh"
_LLAVA_TRAINER = "LLaVA-EAS/llava/train/pia_trainer.py"
_LAVIN_ADAPTER = "LaVIN-EAS/eas/mm_adapter.py"
_LAVIN_SEARCH = "LaVIN-EAS/scripts/search_sqa_7b.sh"
_LAVIN_TUNE = "LaVIN-EAS/scripts/finetuning_sqa_7b.sh"
_LAVIN_ENGINE = "LaVIN-EAS/engine.py"
_LAVIN_TRAIN = "LaVIN-EAS/train.py"

_NOT_CHECKED = "not checked"

_LLAVA_SOURCES = {
    "eas.replace_dim": Source("256 (skipping)", f"--replaced_dim 256 ({_LLAVA_SEARCH}, {_LLAVA_TUNE})"),
    "eas.adapt_dim": Source("128 (adaptation)", f"--adapt_dim 128 ({_LLAVA_SEARCH}, {_LLAVA_TUNE})"),
    "eas.dropout": Source(_NOT_CHECKED, f"nn.Dropout(0.1) in both PIAs ({_LLAVA_ADAPTER})"),
    "eas.train_projector": Source(
        _NOT_CHECKED,
        f"the projector trains, at its own lr --mm_projector_lr 4e-4 ({_LLAVA_TUNE}; skipvlm has "
        "one lr for every trained parameter)",
    ),
    "eas.single_path": Source(
        "a single adaptation path",
        f"two routed up-projections in both PIAs, the adapt-PIA's router without a bias ({_LLAVA_ADAPTER}); "
        "kept at 2 paths, as the code runs",
    ),
    "eas.replace_input": Source(
        _NOT_CHECKED,
        f"input_layernorm(h) feeds the replace-PIA, whose output is scaled by "
        f"post_attention_layernorm.weight ({_LLAVA_ADAPTER}): 'normed'",
    ),
    "eas.freeze_pooled": Source(
        _NOT_CHECKED, f"w and g computed at the first forward (start_pos) and cached ({_LLAVA_ADAPTER})"
    ),
    "train.epochs": Source(_NOT_CHECKED, f"--num_train_epochs 20 ({_LLAVA_TUNE})"),
    "train.lr": Source(_NOT_CHECKED, f"--learning_rate 4e-4, cosine schedule ({_LLAVA_TUNE})"),
    "train.weight_decay": Source(_NOT_CHECKED, f"--weight_decay 0. ({_LLAVA_TUNE})"),
    "train.warmup_ratio": Source(_NOT_CHECKED, f"--warmup_ratio 0.03 ({_LLAVA_TUNE})"),
    "train.grad_accum": Source(
        _NOT_CHECKED, f"--gradient_accumulation_steps 1, 16 per device x 4 GPUs = 64 per step ({_LLAVA_TUNE})"
    ),
    "train.precision": Source(
        _NOT_CHECKED, f"--bf16 True ({_LLAVA_TUNE}); skipvlm's 'auto' is bf16 on a GPU that supports it"
    ),
    "search.train.lr": Source(
        _NOT_CHECKED, f"--learning_rate 2e-4, linear schedule ({_LLAVA_SEARCH}; skipvlm: cosine)"
    ),
    "search.train.warmup_ratio": Source(_NOT_CHECKED, f"--warmup_ratio 0.03 ({_LLAVA_SEARCH})"),
    "search.train.weight_decay": Source(_NOT_CHECKED, f"--weight_decay 0. ({_LLAVA_SEARCH})"),
    "search.warmup_epochs": Source(
        _NOT_CHECKED,
        f"--warmup_steps 2970 micro-batches before the first update ({_LLAVA_SEARCH}): 15 of its "
        "20 epochs on ScienceQA's 12,726 training examples at 64 per step (199 steps per epoch); k grows "
        f"from 1 to k during it ({_LLAVA_TRAINER}; skipvlm: k from the start)",
    ),
    "search.search_epochs": Source(_NOT_CHECKED, f"the other 5 of --num_train_epochs 20 ({_LLAVA_SEARCH})"),
    "search.interval": Source(
        _NOT_CHECKED, f"an update every 3 micro-batches (nas_count >= 3, {_LLAVA_TRAINER})"
    ),
    "search.n_candidates": Source(_NOT_CHECKED, f"nas_step = 5 subsets per update ({_LLAVA_TRAINER})"),
    "search.alpha": Source(_NOT_CHECKED, f"lr = 1.0 ({_LLAVA_TRAINER})"),
    "search.beta": Source(
        _NOT_CHECKED,
        f"no beta: the policy is sigmoid(H) per arm, and subsets are scored on the training "
        f"batch ({_LLAVA_TRAINER}); skipvlm keeps METHODS §3 (softmax(beta H), held-out batches)",
    ),
}

_LAVIN_SOURCES = {
    "eas.adapt_dim": Source(_NOT_CHECKED, f"--adapter_dim 8 ({_LAVIN_SEARCH}, {_LAVIN_TUNE})"),
    "eas.replace_dim": Source(
        _NOT_CHECKED, f"hidden_dim=dim * 4 = 32 for the replace-PIA ({_LAVIN_ADAPTER})"
    ),
    "eas.dropout": Source(_NOT_CHECKED, f"nn.Dropout(0.1) in both PIAs ({_LAVIN_ADAPTER})"),
    "eas.temperature": Source(_NOT_CHECKED, f"--temperature 10. ({_LAVIN_SEARCH})"),
    "eas.train_projector": Source(
        "not stated",
        "trains every parameter named 'adapter' or 'replace' (LaVIN-EAS/eas/mm_adaptation.py); "
        "LaVIN's own architecture has no Hugging Face projector to map: skipvlm's default kept",
    ),
    "eas.freeze_pooled": Source(
        _NOT_CHECKED,
        f"w frozen at prefill; g a running mean over all tokens so far, updated every decoding "
        f"step ({_LAVIN_ADAPTER}): neither switch value; the spec's frozen g kept",
    ),
    "train.epochs": Source(_NOT_CHECKED, f"--epochs 20 ({_LAVIN_TUNE})"),
    "train.lr": Source(
        _NOT_CHECKED,
        f"--blr 9e-3 x effective batch 32 / 256 = 1.125e-3 ({_LAVIN_TUNE}, {_LAVIN_TRAIN}); AdamW "
        "betas (0.9, 0.95), which skipvlm does not expose (it uses (0.9, 0.999))",
    ),
    "train.weight_decay": Source(_NOT_CHECKED, f"--weight_decay 0.02 ({_LAVIN_TUNE})"),
    "train.warmup_ratio": Source(_NOT_CHECKED, f"--warmup_epochs 2 of 20 ({_LAVIN_TUNE})"),
    "train.grad_accum": Source(_NOT_CHECKED, f"--accum_iter 4, batch 4 per GPU x 2 GPUs ({_LAVIN_TUNE})"),
    "train.max_grad_norm": Source(_NOT_CHECKED, f"--clip_grad not set: no clipping ({_LAVIN_TRAIN})"),
    "search.train.lr": Source(_NOT_CHECKED, f"as fine-tuning: 1.125e-3 ({_LAVIN_SEARCH})"),
    "search.train.weight_decay": Source(_NOT_CHECKED, f"--weight_decay 0.02 ({_LAVIN_SEARCH})"),
    "search.train.warmup_ratio": Source(_NOT_CHECKED, f"--warmup_epochs 2 of 10 ({_LAVIN_SEARCH})"),
    "search.train.grad_accum": Source(_NOT_CHECKED, f"--accum_iter 4 ({_LAVIN_SEARCH})"),
    "search.train.max_grad_norm": Source(_NOT_CHECKED, f"no clipping ({_LAVIN_TRAIN})"),
    "search.warmup_epochs": Source(_NOT_CHECKED, f"warmup_epoch = 5 ({_LAVIN_ENGINE})"),
    "search.search_epochs": Source(_NOT_CHECKED, f"the other 5 of --epochs 10 ({_LAVIN_SEARCH})"),
    "search.interval": Source(_NOT_CHECKED, f"nas_turn = 10 micro-batches ({_LAVIN_ENGINE})"),
    "search.n_candidates": Source(_NOT_CHECKED, f"nas_step = 3 ({_LAVIN_ENGINE})"),
    "search.alpha": Source(_NOT_CHECKED, f"lr = 2.0 ({_LAVIN_ENGINE}; 1.0 for VQA)"),
    "search.beta": Source(_NOT_CHECKED, f"softmax(scores * 10) ({_LAVIN_ENGINE})"),
}

_LAVIN_LR = 9e-3 * 32 / 256  # --blr x (4 per GPU x 4 accumulated x 2 GPUs) / 256

RECIPES: dict[str, Recipe] = {
    "llava-1.5": Recipe(
        name="llava-1.5",
        description="EAS on LLaVA (Vicuna-7B, ScienceQA): the official LLaVA-EAS scripts' settings",
        eas=EASConfig(replace_dim=256, adapt_dim=128, dropout=0.1, train_projector=True),
        train=TrainConfig(epochs=20, lr=4e-4, weight_decay=0.0, warmup_ratio=0.03, grad_accum=1),
        search=SearchConfig(
            warmup_epochs=15,
            search_epochs=5,
            interval=3,
            n_candidates=5,
            alpha=1.0,
            train=TrainConfig(lr=2e-4, weight_decay=0.0, warmup_ratio=0.03, grad_accum=1),
        ),
        sources=_LLAVA_SOURCES,
    ),
    "lavin": Recipe(
        name="lavin",
        description="EAS on LaVIN-7B (ScienceQA): the official LaVIN-EAS scripts' settings",
        eas=EASConfig(replace_dim=32, adapt_dim=8, dropout=0.1),
        train=TrainConfig(
            epochs=20, lr=_LAVIN_LR, weight_decay=0.02, warmup_ratio=0.1, grad_accum=4, max_grad_norm=0.0
        ),
        search=SearchConfig(
            warmup_epochs=5,
            search_epochs=5,
            interval=10,
            n_candidates=3,
            alpha=2.0,
            beta=10.0,
            train=TrainConfig(
                lr=_LAVIN_LR, weight_decay=0.02, warmup_ratio=0.2, grad_accum=4, max_grad_norm=0.0
            ),
        ),
        sources=_LAVIN_SOURCES,
    ),
}


def recipe_names() -> list[str]:
    """The names :func:`get_recipe` takes."""
    return sorted(RECIPES)


def get_recipe(name: str) -> Recipe:
    """A fresh copy of the recipe ``name`` (change its configs freely).

    Raises:
        ValueError: no recipe of that name; the message lists the names.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
    return copy.deepcopy(RECIPES[name])


def recipe_table() -> str:
    """A Markdown table of every setting a recipe changes: skipvlm's default, each recipe's value, and
    (per recipe) what the paper and the official code say (the README shows it)."""
    names = recipe_names()
    keys = sorted({k for n in names for k in (*RECIPES[n].settings(), *RECIPES[n].sources)}, key=_order)
    head = ["setting", "skipvlm default", *(f"`{n}`" for n in names), "paper", "official code"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        values = [_show(_flat(RECIPES[n]).get(key)) for n in names]
        notes = [RECIPES[n].sources.get(key) for n in names]
        paper = "; ".join(
            f"{n}: {s.paper}"
            for n, s in zip(names, notes, strict=True)
            if s is not None and s.paper != _NOT_CHECKED
        )
        code = "; ".join(f"{n}: {s.official}" for n, s in zip(names, notes, strict=True) if s is not None)
        checked = any(s is not None for s in notes)
        paper = paper or (_NOT_CHECKED if checked else "not stated")
        row = [f"`{key}`", _show(_DEFAULTS.get(key)), *values, paper, code or "not stated"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def _order(key: str) -> tuple[int, str]:
    return (["eas", "train", "search"].index(key.split(".")[0]), key)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value}".replace("|", "/")
