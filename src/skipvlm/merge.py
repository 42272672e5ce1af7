"""Exact re-parameterisation of PIA adapters into the base weights, and export (``shared/METHODS.md`` §2).

With its router weights ``w`` and pooled path ``g`` frozen, a PIA is the affine map ``y = R x + r``.

* A replace-PIA folds into the skipped layer's MLP input projections, ``W' = W diag(gamma_post) R
  diag(gamma_in)`` and ``b' = W (gamma_post * r)``; the layer then runs as a plain skip whose pre-MLP
  norm has gain 1, i.e. ``out = h + N_mo(MLP'(rms(h)))``.
* An adapt-PIA folds into W_q, W_k, W_v: ``W' = W R``, ``b' = W r (+ b)``.
* With ``replace_input="rms"`` the replace-PIA reads ``rms(h)``, and its fold has no ``diag(gamma_in)``:
  ``W' = W diag(gamma_post) R``.
* An FFN-PIA (``mlp_replace="pia"``) is the branch ``F(x) = U V x + r`` on the MLP's input ``x = N_post(a)``:
  it takes the MLP's place as :class:`AffineMLP` (``V`` = W_C: C -> d, ``U = (s/2) M``: d -> C, bias ``r``),
  and the merged model's plan runs that "MLP" (the layer leaves ``skip_mlp``); 2*C*d MACs per token
  instead of 3*C*F.

A model built with ``freeze_pooled=False`` re-pools at every forward, so it is no affine map: every merge
(and export) refuses it.

``gamma_in`` and ``gamma_post`` are the *gains* of the pre-attention and pre-MLP norms
(:class:`~skipvlm.arch.LayerParts`): their weights for Llama / Qwen2 (``input_layernorm``,
``post_attention_layernorm``), ``1 + weight`` for Gemma 3 (``input_layernorm``,
``pre_feedforward_layernorm``). Gemma 3's sandwich norms change nothing else: a replace-PIA layer is
``out = h + N_mo(MLP(gamma_post * PIA_r(rms(h) * gamma_in)))`` with ``N_mo`` its
``post_feedforward_layernorm``, which sits after the MLP and so outside the fold; setting the pre-MLP
gain to 1 is Gemma weight 0. The adapt-PIA fold sits before q/k/v, so Gemma's q/k norms and its
``post_attention_layernorm`` (on the attention output) come after it unchanged. A skipped attention is
exported as ``o_proj = 0``; Gemma's attention-output norm maps that 0 to 0.

Merge modes:

* ``static``: ``w`` / ``g`` are the calibration means gathered over training prompts
  (:meth:`~skipvlm.eas.EASModel.calibrate`); one dense model, any batch size, exportable.
* ``per_example``: each prompt's own ``w`` / ``g``, merged into the weights at prefill (batch size 1),
  as in the EAS paper. It keeps the adapters' tensors and the original input projections of adapted
  layers to re-merge for the next prompt.

Export to a stock checkpoint, and loading one, is :mod:`skipvlm.export`.

After either merge no adapter runs as a branch and skipped attentions hold no weights. Every merge is a
low-rank update (:func:`~skipvlm.pia.fold_into_linear`), never a dense C x C product.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from skipvlm.adapters import AdaptPIARoute, DASRoute, FFNPIARoute, ReplacePIARoute, rms
from skipvlm.arch import (
    LayerParts,
    arch_facts,
    encoder_host,
    get_layers,
)
from skipvlm.eas import EASModel
from skipvlm.pia import (
    AffineMap,
    FrozenPIA,
    PIABase,
    ReplacePIA,
    collapse_adapt,
    collapse_replace,
    fold_into_linear,
    pooled_prompt,
)
from skipvlm.plan import Plan
from skipvlm.routes import Route, Step, attend, mlp_out, normed_input, plain_route
from skipvlm.runtime import RemovedAttention, SkipDecoder, apply_plan

__all__ = [
    "AffineMLP",
    "PerExampleRoute",
    "merge_and_unload",
    "remove_attention",
]

logger = logging.getLogger(__name__)

MODES = ("static", "per_example")


def _targets(parts: LayerParts, replace: bool) -> tuple[str, ...]:
    """Sub-modules of a decoder layer that an adapter kind folds into."""
    if replace:
        return (f"{parts.mlp}.gate_proj", f"{parts.mlp}.up_proj")
    return tuple(f"{parts.attention}.{p}_proj" for p in "qkv")


def _check_mergeable(eas_model: EASModel) -> None:
    """Refuse a model whose adapters are not one affine map (``freeze_pooled=False``)."""
    if not eas_model.eas_config.freeze_pooled:
        raise ValueError(
            "this EAS model was built with EASConfig(freeze_pooled=False): its adapters recompute p, w and g "
            "at every forward (every decoding step), so they are not one affine map and cannot be folded "
            "into the weights; serve it unmerged, or train it with freeze_pooled=True (the default) to merge"
        )


def _active_adapters(decoder: SkipDecoder) -> dict[int, tuple[PIABase | None, ReplacePIA | None]]:
    """Per layer, the PIAs its route runs now: (on the attention side: a replace- or adapt-PIA, or None;
    in the MLP's place: an FFN-PIA, or None). A supernet's idle adapters are left out.

    Raises:
        ValueError: a layer runs a DAS bottleneck adapter, which has a ReLU and cannot be merged.
    """
    routes = decoder.routes
    das = [i for i, route in enumerate(routes) if isinstance(route, DASRoute)]
    if das:
        raise ValueError(
            f"layer(s) {das} are skipped whole with DAS bottleneck adapters, which have a ReLU and so are "
            "not affine: they cannot be folded into the weights; serve the model unmerged"
        )
    active: dict[int, tuple[PIABase | None, ReplacePIA | None]] = {}
    for i, route in enumerate(routes):
        if isinstance(route, ReplacePIARoute):
            active[i] = (route.adapters.replace, None)
        elif isinstance(route, AdaptPIARoute):
            active[i] = (route.adapters.adapt, None)
        elif isinstance(route, FFNPIARoute):
            active[i] = (route.adapters.adapt if route.attention == "adapt" else None, route.adapters.ffn)
    return active


def _merged_plan(plan: Plan, active: dict[int, tuple[PIABase | None, ReplacePIA | None]]) -> Plan:
    """``plan`` with the MLPs that FFN-PIAs replace running again (as :class:`AffineMLP`)."""
    replaced = {i for i, (_, ffn) in active.items() if ffn is not None}
    return plan.with_skips(skip_mlp=[i for i in plan.skip_mlp if i not in replaced])


class AffineMLP(nn.Module):
    """A merged FFN-PIA in a skipped MLP's place: ``x -> U (V x) + r``, rank d (2*C*d MACs per token).

    Args:
        affine: the FFN-PIA's collapsed map (its ``U`` (C, d), ``V`` (d, C), ``r`` (C,); the identity of
            :class:`~skipvlm.pia.AffineMap` is not part of the branch).
        like: a tensor whose dtype and device the weights take.
    """

    def __init__(self, affine: AffineMap, like: torch.Tensor):
        super().__init__()
        c, d = affine.U.shape
        kw = {"device": like.device, "dtype": like.dtype}
        self.down = nn.Linear(c, d, bias=False, **kw)
        self.up = nn.Linear(d, c, bias=True, **kw)
        for p in self.parameters():
            p.requires_grad_(False)
        self.load(affine)

    @torch.no_grad()
    def load(self, affine: AffineMap) -> None:
        """Hold ``affine``'s branch (cast to this module's dtype).

        Raises:
            ValueError: the map is not finite.
        """
        tensors = (affine.V, affine.U, affine.r)
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise ValueError(
                "merging the adapter produced non-finite weights; check the adapter for inf / NaN"
            )
        for target, value in zip((self.down.weight, self.up.weight, self.up.bias), tensors, strict=True):
            target.copy_(value.to(target.dtype))

    def macs_per_token(self) -> int:
        """``2 * C * d``: what :func:`skipvlm.cost.count_macs` counts in this MLP's place."""
        return self.down.weight.numel() + self.up.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _calibrated_affine(layer: int, adapter: PIABase) -> AffineMap:
    if int(adapter.calib_n) == 0:
        raise ValueError(
            f"layer {layer}'s adapter has no calibration means, which the static merge needs; run "
            "model.calibrate(batches) over training prompts first"
        )
    if isinstance(adapter, ReplacePIA):
        return collapse_replace(adapter, adapter.calib_w, adapter.calib_g)
    return collapse_adapt(adapter, adapter.calib_w)


def _fold_layer(
    layer: nn.Module, affine: AffineMap, replace: bool, parts: LayerParts, input_gain: bool = True
) -> dict[str, tuple[torch.Tensor, ...]]:
    """{target name: (W', b')} for one layer's adapter map."""
    pre, post = _fold_scales(layer, replace, parts, input_gain)
    out = {}
    for name in _targets(parts, replace):
        linear = layer.get_submodule(name)
        out[name] = fold_into_linear(linear.weight, affine, linear.bias, pre_scale=pre, post_scale=post)
    return out


def _fold_scales(
    layer: nn.Module, replace: bool, parts: LayerParts, input_gain: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gamma_post, gamma_in), the gains a replace-PIA folds around its map (gamma_in only when it reads
    ``N_in(h)``, ``input_gain``; None when it reads ``rms(h)``); (None, None) for adapt-PIA."""
    if not replace:
        return None, None
    pre = parts.gain(layer.get_submodule(parts.pre_mlp_norm))
    return pre, parts.gain(layer.get_submodule(parts.input_norm)) if input_gain else None


def _set_linear(layer: nn.Module, name: str, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """Put a biased ``nn.Linear`` holding (weight, bias) at ``name`` in ``layer``; returns it."""
    parent_name, _, attr = name.rpartition(".")
    parent = layer.get_submodule(parent_name)
    old = getattr(parent, attr)
    new = nn.Linear(old.in_features, old.out_features, bias=True, device=weight.device, dtype=weight.dtype)
    new.weight = nn.Parameter(weight.detach(), requires_grad=False)
    new.bias = nn.Parameter(bias.detach(), requires_grad=False)
    setattr(parent, attr, new)
    return new


def remove_attention(model: nn.Module, layers: list[int]) -> None:
    """Free the attention weights of ``layers`` (their attention must stay skipped from now on)."""
    name = arch_facts(model).parts.attention
    for i in layers:
        layer = get_layers(model)[i]
        if not isinstance(getattr(layer, name), RemovedAttention):
            setattr(layer, name, RemovedAttention(i))


@torch.no_grad()
def _refuse_encoder(model: nn.Module, what: str) -> None:
    """Raise ValueError for a two-stream encoder host's model (METHODS §7: no merge for post-norm hosts)."""
    if encoder_host(model) is not None:
        from skipvlm.encoders.eas import NOT_MERGEABLE

        raise ValueError(f"cannot {what} a BridgeTower model: {NOT_MERGEABLE}")


def merge_and_unload(eas_model: EASModel, mode: str = "static") -> nn.Module:
    """Fold the adapters of ``eas_model`` into its base weights and return the base model.

    The base model keeps running its skip plan; its skipped attentions are freed. See the module
    docstring for the two modes.

    Args:
        eas_model: the EAS model (consumed: its adapters are removed).
        mode: ``"static"`` or ``"per_example"``.

    Returns:
        The base model with merged weights.

    Raises:
        ValueError: an unknown mode; ``static`` without calibration means; non-finite merged weights.
    """
    if getattr(type(eas_model), "mergeable", True) is False:  # a host that refuses merges says why
        return eas_model.merge_and_unload(mode)
    _refuse_encoder(eas_model, "merge")
    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; use one of {MODES}")
    eas_model.adapters  # noqa: B018  (raises if they were merged already)
    _check_mergeable(eas_model)
    base, decoder, facts = eas_model.base_model, eas_model.decoder, eas_model.facts
    input_gain = eas_model.eas_config.replace_input == "normed"
    plan = decoder.plan
    layers = get_layers(base, facts)
    parts = facts.parts
    active = _active_adapters(decoder)
    merged_plan = _merged_plan(plan, active)
    if mode == "static":
        # every map first (a missing calibration or a non-finite map leaves the model untouched)
        folded = {
            i: _fold_layer(layers[i], _calibrated_affine(i, a), isinstance(a, ReplacePIA), parts, input_gain)
            for i, (a, _) in active.items()
            if a is not None
        }
        ffns = {i: _calibrated_affine(i, ffn) for i, (_, ffn) in active.items() if ffn is not None}
        mlps = {i: AffineMLP(m, _mlp_weight(layers[i], parts)) for i, m in ffns.items()}
        for i, targets in folded.items():
            for name, (w, b) in targets.items():
                _set_linear(layers[i], name, w, b)
            if isinstance(active[i][0], ReplacePIA):
                parts.unit_gain_(layers[i].get_submodule(parts.pre_mlp_norm))
        for i, mlp in mlps.items():
            setattr(layers[i], parts.mlp, mlp)
        decoder.attach({}, merged_plan)
    else:
        recipes = {i: _LayerRecipe(layers[i], a, ffn, parts, input_gain) for i, (a, ffn) in active.items()}
        decoder.attach(recipes, merged_plan)
    remove_attention(base, list(plan.skip_attention))
    if merged_plan != plan:  # FFN-PIAs became MLPs: the config's plan too
        apply_plan(base, merged_plan)
    logger.info("merged %d layers' adapters (%s) into %s", len(active), mode, type(base).__name__)
    return base


class _LayerRecipe(nn.Module):
    """One layer's per-example merge: the frozen adapters and the original input projections (all
    non-persistent buffers). Prepares the layer on construction: biased linears to merge into, holding
    the original weights for now, and ``gamma_post = 1`` for a replace-PIA; an :class:`AffineMLP` in the
    MLP's place for an FFN-PIA."""

    def __init__(
        self,
        layer: nn.Module,
        adapter: PIABase | None,
        ffn: ReplacePIA | None,
        parts: LayerParts,
        input_gain: bool = True,
    ):
        super().__init__()
        self.ffn = FrozenPIA(ffn) if ffn is not None else None
        if ffn is not None:
            zero = AffineMap(*(torch.zeros_like(t) for t in _branch_shapes(ffn)))
            setattr(layer, parts.mlp, AffineMLP(zero, _mlp_weight(layer, parts)))
        self.pia = FrozenPIA(adapter) if adapter is not None else None
        # the replace-PIA reads rms(h) rather than N_in(h)
        self.rms_input = adapter is not None and self.pia.is_replace and not input_gain
        if adapter is None:
            self.targets = ()
            return
        self.targets = _targets(parts, self.pia.is_replace)
        for k, name in enumerate(self.targets):
            linear = layer.get_submodule(name)
            self.register_buffer(f"weight_{k}", linear.weight.detach().clone(), persistent=False)
            bias = linear.bias.detach().clone() if linear.bias is not None else None
            self.register_buffer(f"bias_{k}", bias, persistent=False)
        for name, scale in zip(
            ("pre_scale", "post_scale"),
            _fold_scales(layer, self.pia.is_replace, parts, input_gain),
            strict=True,
        ):
            self.register_buffer(name, None if scale is None else scale.detach().clone(), persistent=False)
        for name in self.targets:
            linear = layer.get_submodule(name)
            bias = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
            _set_linear(layer, name, linear.weight, bias)
        if self.pia.is_replace:
            parts.unit_gain_(layer.get_submodule(parts.pre_mlp_norm))

    def route(self, plan: Plan, i: int) -> Route:
        return PerExampleRoute(i, self, plain_route(plan, i))

    def input_of(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        """What the attention-side adapter reads: ``N_in(h)``, or ``rms(h)`` for an rms-input replace-PIA."""
        if self.rms_input:
            return rms(getattr(layer, step.parts.input_norm), h)
        return normed_input(layer, h, step)

    @torch.no_grad()
    def merge_ffn(self, layer: nn.Module, pooled: torch.Tensor, parts: LayerParts) -> None:
        """Put the FFN-PIA's map for one prompt's pooled MLP input (1, C) into the layer's
        :class:`AffineMLP`."""
        _one_prompt(pooled)
        w = self.ffn.route(pooled)[0]
        g = self.ffn.pooled_path(pooled)[0]
        affine = self.ffn.collapse(w, g)
        layer.get_submodule(parts.mlp).load(affine)

    @torch.no_grad()
    def merge(self, layer: nn.Module, pooled: torch.Tensor) -> None:
        """Fold the attention-side adapter, for one prompt's pooled vector (1, C), into the layer's weights.

        Raises:
            ValueError: the batch holds more than one example.
        """
        _one_prompt(pooled)
        w = self.pia.route(pooled)[0]
        g = self.pia.pooled_path(pooled)[0] if self.pia.is_replace else None
        affine = self.pia.collapse(w, g)
        for k, name in enumerate(self.targets):
            weight, bias = fold_into_linear(
                getattr(self, f"weight_{k}"),
                affine,
                getattr(self, f"bias_{k}"),
                pre_scale=self.pre_scale,
                post_scale=self.post_scale,
            )
            linear = layer.get_submodule(name)
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)


def _mlp_weight(layer: nn.Module, parts: LayerParts) -> torch.Tensor:
    """A weight of the layer's MLP (its dtype and device are the merged map's)."""
    return next(layer.get_submodule(parts.mlp).parameters())


def _one_prompt(pooled: torch.Tensor) -> None:
    if pooled.shape[0] != 1:
        raise ValueError(
            f"a per_example merge folds one prompt's adapters into the weights, so it runs batch size "
            f"1, got {pooled.shape[0]}; for batches use merge_and_unload(mode='static') or keep the "
            "adapters unmerged"
        )


def _branch_shapes(ffn: ReplacePIA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors shaped like an FFN-PIA's collapsed U (C, d), V (d, C) and r (C,)."""
    v = ffn.token.weight
    return v.new_empty(v.shape[1], v.shape[0]), v.new_empty(v.shape), v.new_empty(v.shape[1])


class PerExampleRoute(Route):
    """A layer merged per example (``merge_and_unload("per_example")``): at prefill, fold this prompt's
    adapters into the layer's weights (batch size 1); then, and while decoding, run the plain route of
    the plan with those weights (a replace-PIA layer: ``out = h + N_mo(MLP'(rms(h)))``; an FFN-PIA layer,
    whose merged map is pooled over its MLP input: ``out = a + N_mo(AffineMLP(N_post(a)))``)."""

    def __init__(self, index: int, recipe: _LayerRecipe, inner: Route):
        super().__init__(index, recipe)
        self.inner = inner
        self.runs_attention = inner.runs_attention

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        recipe = self.adapters
        if step.prefill and recipe.pia is not None:
            recipe.merge(layer, pooled_prompt(recipe.input_of(layer, h, step), step.pool_mask()))
        if recipe.ffn is None:
            return self.inner(layer, h, step)
        a = attend(layer, self.index, h, normed_input(layer, h, step), step) if self.runs_attention else h
        x = getattr(layer, step.parts.pre_mlp_norm)(a)
        if step.prefill:
            recipe.merge_ffn(layer, pooled_prompt(x, step.pool_mask()), step.parts)
        return mlp_out(layer, a, x, step)
