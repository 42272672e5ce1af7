"""Visual-token exit inside skipvlm's layer loop: one forward's layouts, and the state decoding keeps.

``shared/METHODS.md`` §4. A :class:`TokenExit` runs beside :class:`~skipvlm.runtime.SkipDecoder`'s
layer loop. Before each layer it asks the plan's method (VTW, FastV or DyVTE: a *policy*) which
positions to keep. When visual tokens leave, the hidden states, the original position ids, the rotary
tables and a 2-D attention mask are gathered into a packed layout (:mod:`skipvlm.tokens.layout`), and
the following layers run on it.

The KV cache stays one ``DynamicCache``: the layers from the exit on store the kept tokens only. Masks
for those layers are built against a *view* of it, a second ``DynamicCache`` sharing those layer
objects with :class:`~transformers.cache_utils.DummyLayer` below the exit, so the stock mask builders
read the packed length. The layers below the exit still hold the whole sequence, so the cache length
and the positions ``generate`` computes are the true ones. The packed masks are kept on the cache and
grow with every decoded token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from skipvlm.compat import Cache, DummyLayer, DynamicCache
from skipvlm.tokens.layout import gather_positions, gather_tokens, pack, scatter_tokens

__all__ = ["ExitState", "Frame", "Policy", "TokenExit", "clear_exit_state", "exit_state"]

_STATE = "skipvlm_token_exit"  # attribute of a DynamicCache: the packed layouts, for decoding


@dataclass
class _Segment:
    """Layers from ``start`` on run on a packed layout whose 2-D mask is ``mask``."""

    start: int
    view: DynamicCache | None
    mask: torch.Tensor  # (B, T') long; grows by the decoded tokens


@dataclass
class ExitState:
    """What a prefill's token exit leaves on the KV cache for the decoding steps.

    Attributes:
        segments: the packed layouts, by first layer.
        exit_layers: per example, the first layer that ran without (some of) its visual tokens; the
            number of layers when none left.
    """

    segments: list[_Segment]
    exit_layers: list[int]


def exit_state(cache: Cache | None) -> ExitState | None:
    """The token-exit state a prefill left on ``cache`` (``None`` if it withdrew nothing)."""
    return None if cache is None else cache.__dict__.get(_STATE)


def clear_exit_state(cache: Cache | None) -> None:
    """Forget a previous prefill's token-exit state (a new prefill under a plan without token exit)."""
    if cache is not None:
        cache.__dict__.pop(_STATE, None)


@dataclass
class Frame:
    """What the layers of one layout need besides hidden states: positions, rotary tables and masks.

    ``index`` (B, T') maps slots to original positions (``None``: this forward's own positions) and
    ``mask`` (B, T') marks real slots. Masks are built on first use, since a layout whose layers all
    skip attention never needs them.
    """

    index: torch.Tensor | None
    mask: torch.Tensor | None
    text_ids: torch.Tensor | None
    rope_ids: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    build_masks: Callable[[], dict[str, Any]]
    _masks: dict[str, Any] | None = field(default=None, repr=False)

    def attention_mask(self, kind: str) -> Any:
        if self._masks is None:
            self._masks = self.build_masks()
        return self._masks[kind]


class Policy(Protocol):
    """A token-exit method: before layer ``i`` of a prefill, which positions stay (None: no change)."""

    def keep(self, i: int, run: TokenExit, hidden: torch.Tensor) -> torch.Tensor | None: ...

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager: ...


class TokenExit:
    """One forward's visual-token exit.

    Args:
        policy: the plan's method.
        frame: the forward's own frame (all positions).
        num_layers: L.
        attends: per layer, whether its attention runs (a packed layout needs a full-length layer
            before it in the cache).
        cache: the KV cache, or None.
        visual: (B, T) bool, the visual positions (prefill; None while decoding).
        attention_mask: the 2-D (B, T) mask given to the forward, or None.
        masks: builds a layer-type -> mask dict from (2-D mask, hidden states, cache).
        rotary: builds the rotary tables from (hidden states, position ids).
    """

    def __init__(
        self,
        policy: Policy,
        frame: Frame,
        num_layers: int,
        attends: list[bool],
        cache: Cache | None,
        visual: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        masks: Callable[[torch.Tensor, torch.Tensor, Cache | None], dict[str, Any]],
        rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ):
        self.policy = policy
        self.root = frame  # the forward's own frame
        self.frame = frame  # the current layout's
        self.num_layers = num_layers
        self.attends = attends
        self.cache = cache
        self.visual = visual
        self.attention_mask = attention_mask
        self._build_masks = masks
        self._rotary = rotary
        self._home: torch.Tensor | None = None  # (B, T, C): the latest state of every position
        self.decoding = visual is None
        if self.decoding:
            self.state = exit_state(cache)
            self._by_start = {s.start: s for s in self.state.segments} if self.state else {}
            return
        batch = visual.shape[0]
        real = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
        self.keep = real  # (B, T): positions in the current layout (padding included at first)
        self.real = real
        self.state = ExitState([], [num_layers] * batch)
        if cache is not None:
            cache.__dict__[_STATE] = self.state

    # --- prefill -------------------------------------------------------------------------------

    def _relayout(self, i: int, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is not None and not bool(self.attention_mask[:, -1].all()):
            raise ValueError(
                "visual-token exit needs left-padded batches (the last position of every row is a real "
                "token); set tokenizer.padding_side = 'left'"
            )
        if self.cache is not None and not any(self.attends[:i]):
            raise ValueError(
                f"visual tokens leave at layer {i}, but no attention runs before it, so no cache layer "
                "holds the whole sequence; keep an attention below the exit layer"
            )
        removed = (self.keep & ~keep & self.visual).any(1).tolist()
        for b, gone in enumerate(removed):
            if gone and self.state.exit_layers[b] == self.num_layers:
                self.state.exit_layers[b] = i
        frame = self.frame
        self._home = (
            hidden if frame.index is None else scatter_tokens(self._home, hidden, frame.index, frame.mask)
        )
        index, mask = pack(keep)  # (B, T'), (B, T')
        hidden = gather_tokens(self._home, index)  # (B, T', C)
        rope_ids = gather_positions(self.root.rope_ids, index)
        text_ids = gather_positions(self.root.text_ids, index)
        view = None
        if self.cache is not None:
            view = DynamicCache()
            view.layers = [DummyLayer() for _ in range(i)] + list(self.cache.layers[i:])
        mask2d = mask.long()
        self.state.segments.append(_Segment(i, view, mask2d))
        self.frame = Frame(
            index,
            mask,
            text_ids,
            rope_ids,
            self._rotary(hidden, rope_ids),
            lambda: self._build_masks(mask2d, hidden, view),
        )
        self.keep = keep
        return hidden

    def visual_in_layout(self) -> torch.Tensor:
        """(B, T') bool: the visual positions of the current layout that are still there."""
        visual = self.visual & self.keep
        if self.frame.index is None:
            return visual
        return gather_tokens(visual, self.frame.index) & self.frame.mask

    def in_layout(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, T) bool in original positions, read in the current layout (padding slots False)."""
        if self.frame.index is None:
            return x & self.keep
        return gather_tokens(x, self.frame.index) & self.frame.mask

    def to_original(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """A (B, T') per-slot value written back to original positions (``fill`` elsewhere)."""
        if self.frame.index is None:
            return x
        out = torch.full(self.visual.shape, fill, dtype=x.dtype, device=x.device)
        rows, slots = self.frame.mask.nonzero(as_tuple=True)
        out[rows, self.frame.index[rows, slots]] = x[rows, slots]
        return out

    # --- the loop ------------------------------------------------------------------------------

    def before_layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Switch layouts if layer ``i`` starts a new one; returns the hidden states to run it on."""
        if self.decoding:
            segment = self._by_start.get(i)
            if segment is not None:
                self._extend(segment, hidden)
            return hidden
        keep = self.policy.keep(i, self, hidden)
        if keep is None:
            return hidden
        keep = self.keep & keep
        if not bool((self.keep & ~keep & self.visual).any()):
            return hidden  # no visual token leaves (e.g. a text-only prompt): nothing changes
        return self._relayout(i, hidden, keep)

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager:
        """A context around layer ``i`` in which the policy may observe it (FastV reads its q and k)."""
        if self.decoding:
            return contextlib.nullcontext()
        return self.policy.watch(i, layer)

    def _extend(self, segment: _Segment, hidden: torch.Tensor) -> None:
        batch, new = hidden.shape[:2]
        if self.attention_mask is not None:
            columns = self.attention_mask[:, -new:].to(segment.mask)
        else:
            columns = segment.mask.new_ones(batch, new)
        segment.mask = torch.cat([segment.mask, columns], dim=1)
        mask2d, view = segment.mask, segment.view
        root = self.root
        self.frame = Frame(
            None,
            None,
            root.text_ids,
            root.rope_ids,
            root.position_embeddings,
            lambda: self._build_masks(mask2d, hidden, view),
        )

    def expand(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states at every original position (withdrawn ones keep their exit-time state)."""
        if self.frame.index is None:
            return hidden
        return scatter_tokens(self._home, hidden, self.frame.index, self.frame.mask)
