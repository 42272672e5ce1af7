"""Routes: what one decoder layer computes under a plan, and the per-forward state the routes share.

``shared/METHODS.md`` §1. A pre-norm decoder layer computes ``a = h + N_ao(Attn(N_in(h)))`` and ``out =
a + N_mo(MLP(N_post(a)))``, where ``N_post`` is the pre-MLP norm and the output norms ``N_ao``, ``N_mo``
are the identity except in Gemma's sandwich layout; the step's :class:`~skipvlm.arch.LayerParts` names
the sub-modules. Applying a plan compiles it into one :class:`Route` per layer; the layer loop of
:class:`~skipvlm.runtime.SkipDecoder` is then ``h = route(layer, h, step)``. This file holds the plain
routes (the stock layer and its skips); methods with trainable modules (EAS's PIA, DAS's bottleneck:
:mod:`skipvlm.adapters`; the per-example merge: :mod:`skipvlm.merge`) subclass :class:`Route` in their
own files. A route's trainable modules live in it, under the child name
``adapters``, so every adapter parameter of a model is named ``...routes.<layer>.adapters...``.

:class:`Step` is everything the routes of one forward share (cache, positions, rotary tables, masks,
the tokens adapters pool over); :class:`Memory` is what a prefill leaves for the decoding steps that
follow it on the same KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from skipvlm import compat
from skipvlm.arch import LayerParts
from skipvlm.compat import Cache
from skipvlm.layout import gather_tokens

__all__ = [
    "Frame",
    "Memory",
    "Route",
    "RouteError",
    "SkipAttention",
    "SkipLayer",
    "SkipMLP",
    "Step",
    "Stock",
    "plain_route",
    "prompt_mask_of",
]


@dataclass
class Frame:
    """The token layout the layers run on now: positions, rotary tables and masks.

    ``index`` (B, T') maps slots to original positions (``None``: the forward's own positions) and
    ``mask`` (B, T') marks real slots; visual-token exit switches layouts. Masks are built on first
    use, since a layout whose layers all skip attention never needs them.
    """

    index: torch.Tensor | None
    mask: torch.Tensor | None
    text_ids: torch.Tensor | None  # position ids for masks and attention (None under 3-D M-RoPE)
    rope_ids: torch.Tensor  # position ids of the rotary tables
    # (cos, sin), or one (cos, sin) per layer type where the model keeps one table per type (Gemma 3)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]]
    build_masks: Callable[[], dict[str, Any]]
    _masks: dict[str, Any] | None = field(default=None, repr=False)

    def attention_mask(self, kind: str) -> Any:
        if self._masks is None:
            self._masks = self.build_masks()
        return self._masks[kind]

    def rotary(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) tables of a layer of type ``kind``."""
        tables = self.position_embeddings
        return tables[kind] if isinstance(tables, dict) else tables


@dataclass
class Memory:
    """What a prefill leaves for the decoding steps on the same KV cache.

    Attributes:
        layers: per layer, state a route computed at prefill (e.g. PIA's frozen router weights).
        token_exit: the token-exit state (the packed layouts), or None when no token left.
        owner: ``id`` of the decoder that ran the prefill (another model's memory is not read).
    """

    layers: dict[int, Any] = field(default_factory=dict)
    token_exit: Any = None
    owner: int = 0


@dataclass
class Step:
    """One forward of the decoder: what every route reads.

    Attributes:
        shape: (batch, length) of the forward's input.
        cache: the KV cache (None without one).
        prefill: True when the forward starts from an empty cache (or runs without one).
        frame: the current token layout.
        layer_types: per layer, the kind of attention mask it takes.
        attention_kwargs: keywords the stock model hands to every attention module.
        memory: the state kept across decoding steps.
        prompt_mask: builds (B, T) bool, the tokens adapters pool over, in original positions (on
            first use, so that a plan without adapters never needs it).
        attends: per layer, whether its attention runs.
        build_masks: builds a layer-type -> mask dict from (2-D mask, hidden states, cache) (token exit
            builds the masks of a packed layout with it).
        rotary: builds the rotary tables from (hidden states, position ids), in the form of
            :attr:`Frame.position_embeddings`.
        attentions: where attention weights are collected (``output_attentions``), else None.
        parts: the decoder layer's sub-modules and norm layout.
    """

    shape: tuple[int, int]
    cache: Cache | None
    prefill: bool
    frame: Frame
    layer_types: tuple[str, ...]
    attention_kwargs: dict[str, Any]
    memory: Memory
    prompt_mask: Callable[[], torch.Tensor]
    attends: tuple[bool, ...]
    build_masks: Callable[[torch.Tensor, torch.Tensor, Cache | None], dict[str, Any]]
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    attentions: list[torch.Tensor | None] | None = None
    parts: LayerParts = field(default_factory=LayerParts)
    _prompt: torch.Tensor | None = field(default=None, repr=False)

    def pool_mask(self) -> torch.Tensor:
        """(B, T') bool: the prompt tokens of the current layout (the prompt follows token exit)."""
        if self._prompt is None:
            self._prompt = self.prompt_mask()
        frame = self.frame
        if frame.index is None:
            return self._prompt
        return gather_tokens(self._prompt, frame.index) & frame.mask


# --- the two sublayers, as the stock layer computes them ----------------------------------------------


def attend(layer: nn.Module, i: int, h: torch.Tensor, x: torch.Tensor, step: Step) -> torch.Tensor:
    """``h + N_ao(Attn(x))``: layer ``i``'s attention on its (normed) input ``x``, with the step's cache,
    mask and positions (``N_ao`` only where the layer has an attention-output norm)."""
    frame, parts = step.frame, step.parts
    kind = step.layer_types[i]
    out, weights = getattr(layer, parts.attention)(
        hidden_states=x,
        attention_mask=frame.attention_mask(kind),
        position_ids=frame.text_ids,
        position_embeddings=frame.rotary(kind),
        **compat.cache_kwargs(step.cache),
        **step.attention_kwargs,
    )
    if step.attentions is not None:
        step.attentions.append(weights)
    if parts.attention_out_norm is not None:
        out = getattr(layer, parts.attention_out_norm)(out)
    return h + out


def normed_input(layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
    """``N_in(h)``: the attention's normed input."""
    return getattr(layer, step.parts.input_norm)(h)


def mlp_out(layer: nn.Module, h: torch.Tensor, x: torch.Tensor, step: Step) -> torch.Tensor:
    """``h + N_mo(MLP(x))``: the MLP on its input ``x`` (``N_mo`` only where the layer has one)."""
    parts = step.parts
    out = getattr(layer, parts.mlp)(x)
    if parts.mlp_out_norm is not None:
        out = getattr(layer, parts.mlp_out_norm)(out)
    return h + out


def feed(layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
    """``h + N_mo(MLP(N_post(h)))``."""
    return mlp_out(layer, h, getattr(layer, step.parts.pre_mlp_norm)(h), step)


class RouteError(ValueError):
    """A layer cannot take the route a plan asks of it (e.g. it lacks the adapter the route runs).

    Compiling a plan gathers these over all layers and raises one error naming every such layer.
    """

    def __init__(self, layer: int, problem: str, fix: str):
        super().__init__(f"layer {layer} {problem}; {fix}")
        self.layer, self.problem, self.fix = layer, problem, fix


# --- routes --------------------------------------------------------------------------------------------


class Route(nn.Module):
    """What layer ``index`` computes; :meth:`forward` states the formula (METHODS §1 notation).

    Args:
        index: the decoder layer.
        adapters: the layer's trainable modules, if a method gave it any (kept across plan changes
            even by a route that does not run them, e.g. a supernet's idle adapter).
    """

    runs_attention = True  # whether the layer's attention runs (and so holds a KV cache layer)

    def __init__(self, index: int, adapters: nn.Module | None = None):
        super().__init__()
        self.index = index
        if adapters is not None:
            self.adapters = adapters

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def retarget(self, plan: Any) -> Route:
        """The route this layer takes under ``plan``: its adapters decide if it has any.

        Raises:
            RouteError: the plan needs an adapter this layer lacks.
        """
        adapters = self._modules.get("adapters")
        if adapters is not None:
            return adapters.route(plan, self.index)
        return plain_route(plan, self.index)

    def extra_repr(self) -> str:
        return f"layer={self.index}"


class Stock(Route):
    """The stock layer: ``a = h + N_ao(Attn(N_in(h)))``, ``out = a + N_mo(MLP(N_post(a)))``."""

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        return feed(layer, attend(layer, self.index, h, normed_input(layer, h, step), step), step)


class SkipAttention(Route):
    """Attention skipped (§1): ``out = h + N_mo(MLP(N_post(h)))``; no q/k/v/o, no kernel, no KV cache.

    Equal to the stock layer with ``o_proj = 0``: ``N_ao(0) = 0`` for an RMSNorm."""

    runs_attention = False

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        return feed(layer, h, step)


class SkipMLP(Route):
    """MLP skipped (§1): ``out = h + N_ao(Attn(N_in(h)))``."""

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        return attend(layer, self.index, h, normed_input(layer, h, step), step)


class SkipLayer(Route):
    """Layer skipped whole (§1, DAS without an adapter): ``out = h``."""

    runs_attention = False

    def forward(self, layer: nn.Module, h: torch.Tensor, step: Step) -> torch.Tensor:
        return h


def plain_route(plan: Any, i: int, adapters: nn.Module | None = None) -> Route:
    """The plain route of layer ``i`` under ``plan``: stock or one of its skips."""
    attention, mlp = plan.runs_attention(i), plan.runs_mlp(i)
    kind = {
        (True, True): Stock,
        (False, True): SkipAttention,
        (True, False): SkipMLP,
        (False, False): SkipLayer,
    }[attention, mlp]
    return kind(i, adapters)


def prompt_mask_of(
    pool_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | dict | None,
    embeds: torch.Tensor,
    repeats: bool = False,
) -> torch.Tensor:
    """(B, T) bool: what adapters pool over at prefill: ``pool_mask`` (see
    :meth:`skipvlm.runtime.TopInputs.pooling`; with ``repeats``, each of its rows stands for ``B / rows``
    consecutive rows), else the non-padding tokens of the 2-D attention mask."""
    batch, length = embeds.shape[:2]
    mask = pool_mask
    if repeats and mask is not None and mask.shape[0] != batch and batch % mask.shape[0] == 0:
        mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)  # as generate expands its inputs
    if mask is None:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2):
            raise ValueError(
                "PIA adapters pool over the prompt's non-padding tokens and need the 2-D (batch, "
                "length) attention_mask to find them; pass that instead of a prepared mask (generate "
                "prepares masks for cache_implementation='static': use the default cache there, or call "
                "generate on the EASModel, which passes the prompt's mask)"
            )
        mask = attention_mask
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"the pooling mask has shape {tuple(mask.shape)} but the input is (batch={batch}, "
            f"length={length}); it must mark the prompt tokens of every row"
        )
    return mask.to(embeds.device, torch.bool)
