"""VTW: withdraw every visual token before one layer, chosen by a KL calibration.

``shared/METHODS.md`` §4. :class:`VTW` is the runtime policy of ``Plan(visual_exit_layer=K)``;
:func:`calibrate_vtw` picks K: for K from ``min_layer`` upward, the mean over calibration examples of
KL(p_K || p_full) of the next-token distribution at the last prompt position, and K = the first layer
whose mean KL is at most eta.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from skipvlm.arch import arch_facts, visual_token_mask
from skipvlm.io import atomic_write_text
from skipvlm.plan import PlanField, TokenExitMethod, exit_layer_value, register_token_exit
from skipvlm.tokens.exit import ExitRunner

__all__ = ["VTW", "VTWCalibration", "calibrate_vtw", "prompt_batches"]

logger = logging.getLogger(__name__)


class VTW:
    """Runtime policy: before layer ``layer``, every visual token leaves."""

    def __init__(self, layer: int):
        self.layer = layer

    def keep(self, i: int, run: Any, hidden: torch.Tensor) -> torch.Tensor | None:
        return ~run.visual if i == self.layer else None

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


METHOD = register_token_exit(
    TokenExitMethod(
        name="vtw",
        fields=(
            PlanField(
                "visual_exit_layer",
                None,
                exit_layer_value,
                "VTW: every visual token leaves before this layer (1..L)",
                int,
                layer=True,
            ),
        ),
        runner=lambda plan, facts: ExitRunner(lambda device: VTW(plan.visual_exit_layer), facts),
        exit_layer=lambda plan: plan.visual_exit_layer,
        macs=lambda plan, visual_tokens, exit_layer: (plan.visual_exit_layer, visual_tokens),
    )
)


def prompt_batches(
    model: nn.Module, examples: Iterable[Any], collator: Any = None, batch_size: int = 8
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready prompt batches on the model's device, from :class:`~skipvlm.data.ChatExample` s (with
    ``collator``) or from batches that are already dicts."""
    from skipvlm.data import ChatExample

    device = next(model.parameters()).device
    items = list(examples)
    if items and isinstance(items[0], ChatExample):
        if collator is None:
            raise ValueError(
                "ChatExample inputs need a collator to become model inputs; pass "
                "collator=skipvlm.data.ChatCollator(processor)"
            )
        items = [collator(items[s : s + batch_size], train=False) for s in range(0, len(items), batch_size)]
    for batch in items:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise ValueError(
                "each batch must be a dict of model inputs with input_ids (or pass ChatExamples)"
            )
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class VTWCalibration:
    """The result of :func:`calibrate_vtw`.

    Attributes:
        layer: the chosen exit layer: the first K >= ``min_layer`` with mean KL <= ``eta``, or the
            number of layers (no exit) when none is.
        kl: mean KL(p_K || p_full) per candidate K.
        eta / min_layer: the settings used.
        num_examples: calibration examples with visual tokens.
        num_layers: L.
    """

    layer: int
    kl: dict[int, float]
    eta: float
    min_layer: int
    num_examples: int
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kl"] = {str(k): v for k, v in self.kl.items()}
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write the calibration as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of the KL curve with eta and the chosen layer."""
        from skipvlm.plots import plot_kl_curve

        chosen = self.layer if self.layer < self.num_layers else None
        return plot_kl_curve(self.kl, self.eta, chosen, path)

    def table(self) -> str:
        lines = ["| K | mean KL |", "|---|---|"]
        for k, v in self.kl.items():
            lines.append(f"| {k}{' (chosen)' if k == self.layer else ''} | {v:.3g} |")
        return "\n".join(lines)


def _last_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**batch, logits_to_keep=1).logits[:, -1]  # (B, V)
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def calibrate_vtw(
    model: nn.Module,
    examples: Sequence[Any],
    eta: float = 0.003,
    min_layer: int = 1,
    collator: Any = None,
    batch_size: int = 8,
    plot: str | os.PathLike | None = None,
    progress: bool = True,
) -> VTWCalibration:
    """Choose VTW's exit layer K on calibration examples.

    The model runs under its current plan (skipped attentions and adapters included), so the layer is
    calibrated for the model that will serve.

    Args:
        model: a supported multimodal model or an :class:`~skipvlm.EASModel`.
        examples: :class:`~skipvlm.data.ChatExample` s (with ``collator``) or model-ready prompt batches.
        eta: the KL threshold (about 0.003 for a 7B model).
        min_layer: the first candidate K.
        collator: turns ChatExamples into batches.
        batch_size: examples per forward.
        plot: also write the KL curve as a PNG here.
        progress: show a progress bar.

    Returns:
        A :class:`VTWCalibration` with the chosen layer and the per-layer KL curve.

    Raises:
        ValueError: ``eta`` is negative, ``min_layer`` is out of range, or no example has an image.
    """
    from skipvlm.runtime import current_plan, use_plan

    facts = arch_facts(model)
    num_layers = facts.num_layers
    if not facts.is_multimodal:
        raise ValueError(f"a {facts.model_type} model has no visual tokens to withdraw")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not 1 <= min_layer < num_layers:
        raise ValueError(
            f"min_layer must lie in 1..{num_layers - 1} for a {num_layers}-layer model, got {min_layer}"
        )
    base = current_plan(model).skips_only()
    candidates = []
    for k in range(min_layer, num_layers):
        try:
            candidates.append((k, base.replace(visual_exit_layer=k)))
        except ValueError as e:  # e.g. every attention below k is skipped
            logger.info("VTW calibration skips K=%d: %s", k, e)
    if not candidates:
        raise ValueError(f"no exit layer from {min_layer} on is valid with this model's plan {base}")
    was_training = model.training
    model.eval()
    sums = {k: 0.0 for k, _ in candidates}
    count = 0
    try:
        batches = list(prompt_batches(model, examples, collator, batch_size))
        bar = tqdm(total=len(batches) * (len(candidates) + 1), desc="VTW calibration", disable=not progress)
        for batch in batches:
            ids = batch["input_ids"]
            has_image = visual_token_mask(ids, facts).any(1)
            with use_plan(model, base):
                full = _last_logprobs(model, batch)[has_image]
            bar.update()
            for k, plan in candidates:
                with use_plan(model, plan):
                    exited = _last_logprobs(model, batch)[has_image]
                kl = (exited.exp() * (exited - full)).sum(-1)  # (B,) KL(p_K || p_full)
                sums[k] += float(kl.clamp_min(0).sum())
                bar.update()
            count += int(has_image.sum())
        bar.close()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no calibration example has an image; VTW calibrates on multimodal prompts")
    kl = {k: s / count for k, s in sums.items()}
    layer = next((k for k, v in kl.items() if v <= eta), num_layers)
    if layer == num_layers:
        logger.warning("no exit layer reaches mean KL <= eta=%g; VTW would keep every visual token", eta)
    result = VTWCalibration(layer, kl, float(eta), min_layer, count, num_layers)
    if plot is not None:
        result.plot(plot)
    return result
