"""The routes of adapter methods: EAS's PIA (``shared/METHODS.md`` §2) and DAS's bottleneck (§3).

A layer of an EAS model holds its adapters in one :class:`LayerAdapters` (a replace-PIA, an adapt-PIA,
a DAS bottleneck: those its configuration built). It lives in the layer's route, under the child name
``adapters``, and :meth:`LayerAdapters.route` is the one place that decides, from a plan, which route
the layer takes:

=====================  ==================  ==========================================================
attention / MLP        adapter             route and formula
=====================  ==================  ==========================================================
kept / kept            adapt-PIA           :class:`AdaptPIARoute`: ``a = h + N_ao(Attn(PIA_a(N_in(h))))``,
                                           ``out = a + N_mo(MLP(N_post(a)))``
kept / skipped         adapt-PIA           :class:`AdaptPIARoute` without the MLP: ``out = a``
skipped / kept         replace-PIA         :class:`ReplacePIARoute`:
                                           ``out = h + N_mo(MLP(g * PIA_r(N_in(h))))``
skipped / skipped      DAS bottleneck      :class:`DASRoute`: ``out = h + A(N_in(h))``
skipped / skipped      none                :class:`~skipvlm.routes.SkipLayer`: ``out = h``
kept                   none                the plain route (stock, or MLP skipped)
=====================  ==================  ==========================================================

(``g``: ``gamma_post``, the gain of the layer's pre-MLP norm ``N_post``: its weight for Llama / Qwen2, whose
``post_attention_layernorm`` it is, ``1 + weight`` of ``pre_feedforward_layernorm`` for Gemma 3. ``N_ao``
and ``N_mo`` are Gemma's norms on the attention and MLP outputs, the identity elsewhere; see
:class:`~skipvlm.arch.LayerParts`.)

A plan whose skipped attention has no replace-PIA (or, with ``adapt_layers="kept"``, whose kept
attention has no adapt-PIA) is refused. PIA's router weights and pooled path are computed from the
prompt at prefill and kept, frozen, in the step memory for the decoding steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from skipvlm.pia import AdaptPIA, BottleneckAdapter, PIABase, ReplacePIA, pooled_prompt
from skipvlm.routes import (
    Route,
    RouteError,
    SkipLayer,
    Step,
    attend,
    feed,
    mlp_out,
    normed_input,
    plain_route,
)

__all__ = ["AdaptPIARoute", "DASRoute", "LayerAdapters", "ReplacePIARoute"]


class LayerAdapters(nn.Module):
    """The adapters of one decoder layer, and the rule that picks its route.

    Args:
        replace: the replace-PIA (run when the layer's attention is skipped), if built.
        adapt: the adapt-PIA (run on the kept attention's input), if built.
        bottleneck: the DAS bottleneck adapter (run when the layer is skipped whole), if built.
        require_adapt: a kept attention must run its adapt-PIA (``adapt_layers="kept"``).
    """

    def __init__(
        self,
        replace: ReplacePIA | None = None,
        adapt: AdaptPIA | None = None,
        bottleneck: BottleneckAdapter | None = None,
        require_adapt: bool = False,
    ):
        super().__init__()
        self.replace, self.adapt, self.bottleneck = replace, adapt, bottleneck
        self.require_adapt = require_adapt
        # Router weights / pooled paths from the calibration means (what the static merge folds in),
        # and whether computed ones are folded into those means (calibration).
        self.use_calibration = False
        self.collecting = False

    def route(self, plan: Any, i: int) -> Route:
        """The route of layer ``i`` under ``plan``.

        Raises:
            RouteError: the plan needs an adapter this layer lacks.
        """
        attention, mlp = plan.runs_attention(i), plan.runs_mlp(i)
        if not attention and not mlp:
            return DASRoute(i, self) if self.bottleneck is not None else SkipLayer(i, self)
        if not attention:
            if self.replace is None:
                raise _missing(i)
            return ReplacePIARoute(i, self)
        if self.adapt is None:
            if self.require_adapt:
                raise _missing(i)
            return plain_route(plan, i, self)
        return AdaptPIARoute(i, self, mlp=mlp)

    def router_state(
        self, pia: PIABase, i: int, x: torch.Tensor, step: Step
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w (B, 2), g (B, d) or None) of ``pia`` for layer ``i`` with normed input x (B, T, C).

        Computed at prefill (from the pooled prompt, or the calibration means) and kept in the step
        memory; every decoding step reads it back.
        """
        if not step.prefill:
            state = step.memory.layers.get(i)
            if state is None:
                raise ValueError(
                    "this KV cache was filled without skipvlm adapters, so there is no prompt state to "
                    "decode with; start generation from the prompt with this model"
                )
            return state
        replace = isinstance(pia, ReplacePIA)
        batch = x.shape[0]
        if self.use_calibration:
            if int(pia.calib_n) == 0:
                raise ValueError(
                    f"layer {i}'s adapter has no calibration means yet; run model.calibrate(batches) "
                    "over training prompts first"
                )
            w = pia.calib_w.to(x.dtype).expand(batch, -1)
            g = pia.calib_g.to(x.dtype).expand(batch, -1) if replace else None
        else:
            pooled = pooled_prompt(x, step.pool_mask())  # (B, C)
            w = pia.route(pooled)
            g = pia.pooled_path(pooled) if replace else None
            if self.collecting:
                pia.record(w, g)
        step.memory.layers[i] = (w, g)
        return w, g


def _missing(i: int) -> RouteError:
    return RouteError(
        i,
        "have no adapter for that role (a replace-PIA for a skipped attention, an adapt-PIA for a kept one)",
        "build the model with EASConfig(supernet=True) to move skips anywhere",
    )


class AdaptPIARoute(Route):
    """A kept attention with an adapt-PIA on its input (§2):
    ``a = h + N_ao(Attn(PIA_a(N_in(h))))``, ``out = a + N_mo(MLP(N_post(a)))`` (``out = a`` with the MLP
    skipped)."""

    def __init__(self, index: int, adapters: LayerAdapters, mlp: bool = True):
        super().__init__(index, adapters)
        self.mlp = mlp

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        x = normed_input(layer, h, step)
        pia = self.adapters.adapt
        w, _ = self.adapters.router_state(pia, self.index, x, step)
        a = attend(layer, self.index, h, pia(x, None, w=w), step)
        return feed(layer, a, step) if self.mlp else a


class ReplacePIARoute(Route):
    """A skipped attention replaced by PIA (§2): ``out = h + N_mo(MLP(gamma_post * PIA_r(N_in(h))))``.

    The PIA output feeds the MLP through ``gamma_post``, the pre-MLP norm's gain, without a second rms;
    ``N_mo`` is the MLP-output norm where the layer has one (Gemma 3), else the identity. No q/k/v/o, no
    kernel, no KV cache.
    """

    runs_attention = False

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        x = normed_input(layer, h, step)
        pia = self.adapters.replace
        w, g = self.adapters.router_state(pia, self.index, x, step)
        gain = step.parts.gain(getattr(layer, step.parts.pre_mlp_norm))
        y = pia(x, None, w=w, g=g)
        return mlp_out(layer, h, (gain * y).to(y.dtype), step)


class DASRoute(Route):
    """A layer skipped whole and replaced by DAS's bottleneck adapter (§3): ``out = h + A(N_in(h))``."""

    runs_attention = False

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        return h + self.adapters.bottleneck(normed_input(layer, h, step))
