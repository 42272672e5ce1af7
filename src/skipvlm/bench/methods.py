"""The models `skipvlm bench` compares: the stock model and the alternatives a user would pick.

Each builder returns a model that times like the trained one of its kind (speed does not depend on
trained values): PEFT LoRA, unmerged PIA adapters, LaVIN (adapt-PIA in every layer, unmerged), the
merged EAS model, the plain skip plan, and the visual-token exit plans (VTW, FastV, EAS + VTW;
``shared/METHODS.md`` §4). Also here: which layers a benchmark skips, and the per-token MACs of the
adapter branches a model carries (the roofline of :func:`~skipvlm.bench.compare.run_bench` counts them).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from skipvlm.arch import arch_facts
from skipvlm.eas import EASConfig, get_eas_model
from skipvlm.lora import ALL_PROJECTIONS, lora_target_modules
from skipvlm.plan import Plan
from skipvlm.runtime import apply_plan

__all__ = [
    "METHODS",
    "TokenExitRows",
    "adapter_macs_per_token",
    "bench_models",
    "lora_model",
    "random_adapters",
    "skip_layers",
]

METHODS = ("stock", "lora", "pia", "lavin", "eas", "skip", "vtw", "fastv", "eas+vtw")
TOKEN_EXIT_METHODS = ("vtw", "fastv", "eas+vtw")
LAVIN_ADAPT_DIM = 8  # LaVIN's adapter bottleneck


@dataclass(frozen=True)
class TokenExitRows:
    """The visual-token exit rows of a benchmark (``vtw``, ``fastv``, ``eas+vtw``)."""

    vtw_layer: int = field(default=16, metadata={"help": "VTW: visual tokens withdrawn before layer K"})
    fastv_layer: int = field(default=2, metadata={"help": "FastV: the layer K its pruning starts at"})
    fastv_ratio: float = field(default=0.5, metadata={"help": "FastV: share R of visual tokens dropped"})
    eas_vtw_counts: tuple[int, ...] = field(
        default=(), metadata={"help": "skipped attentions of the eas+vtw rows (default: each k > 0 benched)"}
    )

    def __post_init__(self) -> None:
        for name in ("vtw_layer", "fastv_layer"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"TokenExitRows.{name} must be a layer index >= 1, got {getattr(self, name)}"
                )
        if not 0.0 < self.fastv_ratio < 1.0:
            raise ValueError(f"TokenExitRows.fastv_ratio must lie in (0, 1), got {self.fastv_ratio}")
        if any(k < 1 for k in self.eas_vtw_counts):
            raise ValueError(f"TokenExitRows.eas_vtw_counts must be >= 1 each, got {self.eas_vtw_counts}")


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


def _merged_eas(model: nn.Module, inputs: Mapping[str, torch.Tensor], plan: Plan) -> nn.Module:
    eas = get_eas_model(copy.deepcopy(model), EASConfig(skip_attention=list(plan.skip_attention)))
    return random_adapters(eas, inputs).merge_and_unload("static")


@torch.no_grad()
def bench_models(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    skips: Sequence[int],
    methods: Sequence[str],
    exits: TokenExitRows | None = None,
) -> dict[str, nn.Module]:
    """The stock model and a copy per method to compare with it, keyed by the name its row carries.

    Methods: ``stock``; ``lora`` (PEFT LoRA r=8 on every projection, unmerged); ``pia`` (PIA adapters,
    nothing skipped, unmerged: an adapter branch); ``lavin`` (LaVIN's form: adapt-PIA with bottleneck 8
    in every layer, nothing skipped, unmerged); ``eas`` (k attentions skipped, adapters merged with the
    static merge, for every k in ``skips``); ``skip`` (the plain skip plan, no adapters, for every k > 0
    in ``skips``); ``vtw`` / ``fastv`` (the stock model with that visual-token exit, at ``exits``'
    settings); ``eas+vtw`` (merged EAS at each of ``exits.eas_vtw_counts``, default every k > 0 of
    ``skips``, with VTW). The stock model is always included and left as it is.

    Args:
        model: the stock model; every other entry is built on a deep copy.
        inputs: the prompt the adapters are calibrated on.
        skips: numbers of attentions to skip (:func:`skip_layers` picks which).
        methods: names from :data:`METHODS`.
        exits: the token-exit rows' settings (default :class:`TokenExitRows`).

    Raises:
        ValueError: an unknown method name; a token-exit layer the model does not have.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    exits = exits or TokenExitRows()
    num_layers = arch_facts(model).num_layers
    if any(m in methods for m in TOKEN_EXIT_METHODS):
        for name in ("vtw_layer", "fastv_layer"):
            if getattr(exits, name) >= num_layers:
                raise ValueError(
                    f"--{name.replace('_', '-')} {getattr(exits, name)}: the model has {num_layers} layers"
                )
    models: dict[str, nn.Module] = {"stock": model}
    if "lora" in methods:
        models["lora (unmerged)"] = lora_model(copy.deepcopy(model))
    if "pia" in methods:
        models["pia (unmerged)"] = random_adapters(get_eas_model(copy.deepcopy(model), EASConfig()), inputs)
    if "lavin" in methods:
        config = EASConfig(adapt_dim=LAVIN_ADAPT_DIM, adapt_layers="kept")  # nothing skipped: every layer
        models["lavin (unmerged)"] = random_adapters(get_eas_model(copy.deepcopy(model), config), inputs)
    if "vtw" in methods:
        models[f"vtw K={exits.vtw_layer}"] = apply_plan(
            copy.deepcopy(model), Plan(visual_exit_layer=exits.vtw_layer)
        )
    if "fastv" in methods:
        plan = Plan(fastv_layer=exits.fastv_layer, fastv_ratio=exits.fastv_ratio)
        models[f"fastv K={exits.fastv_layer} R={exits.fastv_ratio:g}"] = apply_plan(
            copy.deepcopy(model), plan
        )
    for k in skips:
        plan = Plan(skip_attention=skip_layers(num_layers, k))
        if "skip" in methods and k:
            models[f"skip k={k}"] = apply_plan(copy.deepcopy(model), plan)
        if "eas" in methods:
            models[f"eas k={k} (merged)"] = _merged_eas(model, inputs, plan)
    combined = exits.eas_vtw_counts or tuple(k for k in skips if k)
    if "eas+vtw" in methods:
        for k in combined:
            plan = Plan(skip_attention=skip_layers(num_layers, k))
            merged = _merged_eas(model, inputs, plan)
            apply_plan(merged, Plan(skip_attention=plan.skip_attention, visual_exit_layer=exits.vtw_layer))
            models[f"eas k={k} + vtw K={exits.vtw_layer}"] = merged
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
