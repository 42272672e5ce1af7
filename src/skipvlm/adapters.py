"""The routes of adapter methods: EAS's PIA (``shared/METHODS.md`` §2) and DAS's bottleneck (§3).

A layer of an EAS model holds its adapters in one :class:`LayerAdapters` (a replace-PIA, an adapt-PIA,
a DAS bottleneck, an FFN-PIA: those its configuration built). It lives in the layer's route, under the child
name ``adapters``, and :meth:`LayerAdapters.route` is the one place that decides, from a plan, which route
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
any / skipped          FFN-PIA             :class:`FFNPIARoute`: ``out = a + N_mo(F(N_post(a)))`` with
                                           ``a`` as the attention runs (stock, adapt-PIA, or skipped:
                                           ``a = h``)
=====================  ==================  ==========================================================

FFN-PIA (``EASConfig(mlp_replace="pia")``, the FFN rows of the paper's candidate table): a skipped MLP is
replaced by the replace-PIA's residual branch on the MLP's own input ``x = N_post(a)``,

    g = W_A p + b_A,  h_n = 0.5 Dropout(g + W_C x_n + b_C),  F(x_n) = s sum_k w_k (U_k h_n + c_k),

with ``p`` pooled over the prompt tokens of ``x``. ``U_k, c_k`` start at zero, so a fresh FFN-PIA is
exactly the plain MLP skip (``N_mo(0) = 0``); with ``w, g`` frozen it is the low-rank affine map ``x ->
U V x + r`` that :mod:`skipvlm.merge` puts in the MLP's place (``N_mo`` stays after it, outside the fold).
A layer whose attention and MLP are both skipped and that has an FFN-PIA (and no DAS bottleneck) skips
its attention plainly (``a = h``; its replace-PIA, if built, stays idle).

Replace-PIA input (``EASConfig.replace_input``): ``"normed"`` reads ``N_in(h) = gamma_in * rms(h)`` (the
spec and the official code; a fresh model then feeds ``gamma_post * gamma_in * rms(h)`` to the MLP, not the
plain skip's ``gamma_post * rms(h)``); ``"rms"`` reads ``rms(h)``, so a fresh model is exactly the plain skip.

Pooled state (``EASConfig.freeze_pooled``): by default every PIA's ``w`` and ``g`` are computed from the
prompt at prefill and frozen in the step memory for the decoding steps. With ``freeze_pooled=False`` they
are recomputed at every forward from the tokens that forward holds (the prompt at prefill and in
training, the new tokens at each decoding step): no longer one affine map, so never merged.

(``g``: ``gamma_post``, the gain of the layer's pre-MLP norm ``N_post``: its weight for Llama / Qwen2, whose
``post_attention_layernorm`` it is, ``1 + weight`` of ``pre_feedforward_layernorm`` for Gemma 3. ``N_ao``
and ``N_mo`` are Gemma's norms on the attention and MLP outputs, the identity elsewhere; see
:class:`~skipvlm.arch.LayerParts`.)

A plan whose skipped attention has no replace-PIA (or, with ``adapt_layers="kept"``, whose kept
attention has no adapt-PIA; or, with ``mlp_replace="pia"``, whose skipped MLP has no FFN-PIA) is refused.
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

__all__ = ["AdaptPIARoute", "DASRoute", "FFNPIARoute", "LayerAdapters", "ReplacePIARoute", "rms"]

REPLACE_INPUTS = ("normed", "rms")


def rms(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``rms(h) = h / sqrt(mean(h^2) + eps)`` as the RMSNorm ``norm`` computes it before its gain (in float32,
    cast back to ``h``'s dtype), with the norm's own epsilon."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is None:
        eps = norm.eps
    x = h.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class LayerAdapters(nn.Module):
    """The adapters of one decoder layer, and the rule that picks its route.

    Args:
        replace: the replace-PIA (run when the layer's attention is skipped), if built.
        adapt: the adapt-PIA (run on the kept attention's input), if built.
        bottleneck: the DAS bottleneck adapter (run when the layer is skipped whole), if built.
        require_adapt: a kept attention must run its adapt-PIA (``adapt_layers="kept"``).
        ffn: the FFN-PIA (run when the layer's MLP is skipped), if built.
        require_ffn: a skipped MLP must run its FFN-PIA (``mlp_replace="pia"``).
        freeze_pooled: compute ``w`` and ``g`` at prefill and keep them for decoding (the spec); False:
            recompute them at every forward from the tokens it holds.
        replace_input: what the replace-PIA reads: ``"normed"`` (``N_in(h)``) or ``"rms"`` (``rms(h)``).
    """

    def __init__(
        self,
        replace: ReplacePIA | None = None,
        adapt: AdaptPIA | None = None,
        bottleneck: BottleneckAdapter | None = None,
        require_adapt: bool = False,
        ffn: ReplacePIA | None = None,
        require_ffn: bool = False,
        freeze_pooled: bool = True,
        replace_input: str = "normed",
    ):
        super().__init__()
        if replace_input not in REPLACE_INPUTS:
            raise ValueError(f"replace_input must be one of {REPLACE_INPUTS}, got {replace_input!r}")
        self.replace, self.adapt, self.bottleneck = replace, adapt, bottleneck
        self.ffn = ffn  # a child only when built: the state of a model without FFN-PIAs is unchanged
        self.require_adapt, self.require_ffn = require_adapt, require_ffn
        self.freeze_pooled, self.replace_input = freeze_pooled, replace_input
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
        if not attention and not mlp and self.bottleneck is not None:
            return DASRoute(i, self)
        if not mlp and self.ffn is None and self.require_ffn:
            raise RouteError(
                i,
                "has no FFN-PIA for its skipped MLP (mlp_replace='pia')",
                "build the model with EASConfig(supernet=True, candidates='mlp' or 'attention_or_mlp') to "
                "move MLP skips anywhere",
            )
        if not mlp and self.ffn is not None:
            if not attention:
                return FFNPIARoute(i, self, attention="skip")
            if self.adapt is None and self.require_adapt:
                raise _missing(i)
            return FFNPIARoute(i, self, attention="stock" if self.adapt is None else "adapt")
        if not attention and not mlp:
            return SkipLayer(i, self)
        if not attention:
            if self.replace is None:
                raise _missing(i)
            return ReplacePIARoute(i, self)
        if self.adapt is None:
            if self.require_adapt:
                raise _missing(i)
            return plain_route(plan, i, self)
        return AdaptPIARoute(i, self, mlp=mlp)

    def replace_input_of(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        """What the replace-PIA reads: ``N_in(h)`` (``"normed"``) or ``rms(h)`` (``"rms"``)."""
        if self.replace_input == "rms":
            return rms(getattr(layer, step.parts.input_norm), h)
        return normed_input(layer, h, step)

    def router_state(
        self, pia: PIABase, i: int, x: torch.Tensor, step: Step, role: str = "attention"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w (B, K), g (B, d) or None) of ``pia`` for layer ``i`` with input x (B, T, C).

        Computed at prefill (from the pooled prompt, or the calibration means) and kept in the step
        memory under (layer, ``role``); every decoding step reads it back. With ``freeze_pooled=False`` a
        decoding step recomputes them from the mean of its own tokens instead.
        """
        key = i if role == "attention" else (i, role)
        replace = isinstance(pia, ReplacePIA)
        if not step.prefill and not self.freeze_pooled and not self.use_calibration:
            pooled = x.mean(dim=1)  # (B, C): the tokens this decoding step holds
            return pia.route(pooled), pia.pooled_path(pooled) if replace else None
        if not step.prefill:
            state = step.memory.layers.get(key)
            if state is None:
                raise ValueError(
                    "this KV cache was filled without skipvlm adapters, so there is no prompt state to "
                    "decode with; start generation from the prompt with this model"
                )
            return state
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
        step.memory.layers[key] = (w, g)
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
    """A skipped attention replaced by PIA (§2): ``out = h + N_mo(MLP(gamma_post * PIA_r(N_in(h))))``
    (``PIA_r(rms(h))`` with ``replace_input="rms"``).

    The PIA output feeds the MLP through ``gamma_post``, the pre-MLP norm's gain, without a second rms;
    ``N_mo`` is the MLP-output norm where the layer has one (Gemma 3), else the identity. No q/k/v/o, no
    kernel, no KV cache.
    """

    runs_attention = False

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        x = self.adapters.replace_input_of(layer, h, step)
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


class FFNPIARoute(Route):
    """A skipped MLP replaced by an FFN-PIA: ``out = a + N_mo(F(N_post(a)))`` (see the module docstring).

    ``a`` is the attention's output as the layer runs it: ``h + N_ao(Attn(N_in(h)))`` (``"stock"``), the
    same with the adapt-PIA on the attention's input (``"adapt"``), or ``h`` (``"skip"``: no q/k/v/o, no
    kernel, no KV cache).

    Args:
        index: the decoder layer.
        adapters: the layer's adapters (holding the FFN-PIA).
        attention: ``"stock"``, ``"adapt"`` or ``"skip"``.
    """

    def __init__(self, index: int, adapters: LayerAdapters, attention: str = "stock"):
        super().__init__(index, adapters)
        self.attention = attention
        self.runs_attention = attention != "skip"

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        a = h
        if self.attention == "adapt":
            x = normed_input(layer, h, step)
            pia = self.adapters.adapt
            w, _ = self.adapters.router_state(pia, self.index, x, step)
            a = attend(layer, self.index, h, pia(x, None, w=w), step)
        elif self.attention == "stock":
            a = attend(layer, self.index, h, normed_input(layer, h, step), step)
        return ffn_pia_out(layer, a, self.adapters, self.index, step)


def ffn_pia_out(
    layer: nn.Module, a: torch.Tensor, adapters: LayerAdapters, i: int, step: Step
) -> torch.Tensor:
    """``a + N_mo(F(N_post(a)))``: layer ``i``'s FFN-PIA in place of its MLP."""
    parts = step.parts
    x = getattr(layer, parts.pre_mlp_norm)(a)
    pia = adapters.ffn
    w, g = adapters.router_state(pia, i, x, step, role="mlp")
    out = pia.residual(x, None, w=w, g=g)
    if parts.mlp_out_norm is not None:
        out = getattr(layer, parts.mlp_out_norm)(out)
    return a + out.to(a.dtype)
