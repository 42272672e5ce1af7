"""The models `skipvlm bench` compares: the stock model and the alternatives a user would pick.

Each builder returns a model that times like the trained one of its kind (speed does not depend on
trained values): PEFT LoRA, unmerged PIA adapters, the merged EAS model, the plain skip plan. Also
here: which layers a benchmark skips, and the per-token MACs of the adapter branches a model carries
(the roofline of :func:`~skipvlm.bench.compare.run_bench` counts them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from skipvlm.arch import arch_facts
from skipvlm.eas import EASConfig, get_eas_model
from skipvlm.lora import ALL_PROJECTIONS, lora_target_modules
from skipvlm.plan import Plan
from skipvlm.runtime import apply_plan

__all__ = [
    "METHODS",
    "adapter_macs_per_token",
    "bench_models",
    "lora_model",
    "random_adapters",
    "skip_layers",
]

METHODS = ("stock", "lora", "pia", "eas", "skip")


def skip_layers(num_layers: int, k: int) -> list[int]:
    """The k attentions a benchmark skips: odd layers first (layer 0 kept), then even ones from the top."""
    order = list(range(1, num_layers, 2)) + list(range(num_layers - 2, -1, -2))
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot skip {k} attentions of a {num_layers}-layer model")
    return sorted(order[:k])


def lora_model(model: nn.Module, rank: int = 8, modules: Sequence[str] = ALL_PROJECTIONS) -> nn.Module:
    """``model`` with PEFT LoRA (alpha = 2 r, no dropout) on the text model's ``modules`` that run
    under its plan (:func:`skipvlm.lora_target_modules`)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, modules)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config).eval()


@torch.no_grad()
def random_adapters(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> nn.Module:
    """Non-zero adapters, calibrated on the prompt, as after training (speed does not depend on values)."""
    gen = torch.Generator().manual_seed(0)
    for p in model.adapters.parameters():
        p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))
    model.calibrate([dict(inputs)], progress=False)
    return model.eval()


@torch.no_grad()
def bench_models(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], skips: Sequence[int], methods: Sequence[str]
) -> dict[str, nn.Module]:
    """The stock model and a copy per method to compare with it, keyed by the name its row carries.

    Methods: ``stock``; ``lora`` (PEFT LoRA r=8 on every projection, unmerged); ``pia`` (PIA adapters,
    nothing skipped, unmerged: an adapter branch); ``eas`` (k attentions skipped, adapters merged with
    the static merge, for every k in ``skips``); ``skip`` (the plain skip plan, no adapters, for every
    k > 0 in ``skips``). The stock model is always included and left as it is.

    Args:
        model: the stock model; every other entry is built on a deep copy.
        inputs: the prompt the adapters are calibrated on.
        skips: numbers of attentions to skip (:func:`skip_layers` picks which).
        methods: names from :data:`METHODS`.

    Raises:
        ValueError: an unknown method name.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    num_layers = arch_facts(model).num_layers
    models: dict[str, nn.Module] = {"stock": model}
    if "lora" in methods:
        models["lora (unmerged)"] = lora_model(copy.deepcopy(model))
    if "pia" in methods:
        models["pia (unmerged)"] = random_adapters(get_eas_model(copy.deepcopy(model), EASConfig()), inputs)
    for k in skips:
        plan = Plan(skip_attention=skip_layers(num_layers, k))
        if "skip" in methods and k:
            models[f"skip k={k}"] = apply_plan(copy.deepcopy(model), plan)
        if "eas" in methods:
            eas = get_eas_model(copy.deepcopy(model), EASConfig(skip_attention=list(plan.skip_attention)))
            models[f"eas k={k} (merged)"] = random_adapters(eas, inputs).merge_and_unload("static")
    return models


def _adapter_param(name: str) -> bool:
    """Whether the parameter ``name`` is a per-token weight of an unmerged PIA adapter branch.

    The adapters live in the layers' routes (``...routes.<layer>.adapters...``); their router and
    pooled path run once per prompt, not per token, so they are left out. This is the one place that
    knows the adapters' parameter names.
    """
    return ".routes." in name and ".adapters." in name and ".router." not in name and ".pool." not in name


def adapter_macs_per_token(model: nn.Module) -> int:
    """MACs per token of branches outside the stock weights (unmerged LoRA / PIA), from their weights."""
    total = 0
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        if "lora_" in name or _adapter_param(name):  # "lora_": PEFT's LoRA parameter names
            total += p.numel()
    return total
