"""Visual-token exit as a hook of skipvlm's layer loop: one forward's layouts, and the state decoding keeps.

``shared/METHODS.md`` §4. A :class:`TokenExit` is the hook a token-exit plan gives each forward of
:class:`~skipvlm.runtime.SkipDecoder`. Before each layer it asks the plan's method (VTW, FastV or DyVTE:
a *policy*) which positions to keep. When visual tokens leave, the hidden states, the original position
ids, the rotary tables and a 2-D attention mask are gathered into a packed layout
(:mod:`skipvlm.layout`), which becomes the step's frame; the following layers, and the tokens adapters
pool over, follow it.

The KV cache stays one ``DynamicCache``: the layers from the exit on store the kept tokens only. Masks
for those layers are built against a *view* of it, a second ``DynamicCache`` sharing those layer
objects with :class:`~transformers.cache_utils.DummyLayer` below the exit, so the stock mask builders
read the packed length. The layers below the exit still hold the whole sequence, so the cache length
and the positions ``generate`` computes are the true ones. The packed masks are kept in the step's
memory (:class:`~skipvlm.routes.Memory`) and grow with every decoded token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from skipvlm.arch import ArchFacts, visual_token_mask
from skipvlm.compat import DummyLayer, DynamicCache
from skipvlm.layout import gather_positions, gather_tokens, pack, scatter_tokens
from skipvlm.routes import Frame, Step

__all__ = ["ExitRunner", "ExitState", "Policy", "TokenExit"]


@dataclass
class _Segment:
    """Layers from ``start`` on run on a packed layout whose 2-D mask is ``mask``."""

    start: int
    view: DynamicCache | None
    mask: torch.Tensor  # (B, T') long; grows by the decoded tokens


@dataclass
class ExitState:
    """What a prefill's token exit leaves in the step memory for the decoding steps.

    Attributes:
        segments: the packed layouts, by first layer.
        exit_layers: per example, the first layer that ran without (some of) its visual tokens; the
            number of layers when none left.
    """

    segments: list[_Segment]
    exit_layers: list[int]


class Policy(Protocol):
    """A token-exit method: before layer ``i`` of a prefill, which positions stay (None: no change)."""

    def keep(self, i: int, run: TokenExit, hidden: torch.Tensor) -> torch.Tensor | None: ...

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager: ...


class ExitRunner:
    """A token-exit plan compiled for one model: builds each forward's :class:`TokenExit`.

    Args:
        policy: builds the method's policy for a prefill on a device.
        facts: the model's architecture facts (which token ids are visual).
    """

    def __init__(self, policy: Callable[[torch.device], Policy], facts: ArchFacts):
        self.policy = policy
        self.facts = facts

    def begin(self, step: Step, ids: torch.Tensor | None, attention_mask: Any) -> TokenExit | None:
        """The hook of one forward (None while decoding after a prefill that withdrew nothing)."""
        if isinstance(attention_mask, dict):
            raise ValueError(
                "visual-token exit builds its own masks from the 2-D (batch, length) attention_mask; pass "
                "that instead of prepared masks"
            )
        if not step.prefill:
            state = step.memory.token_exit
            if state is None:
                raise ValueError(
                    "this KV cache was filled without visual-token exit; start a new cache after changing "
                    "the plan"
                )
            several = ids is not None and ids.shape[1] > 1 and tuple(ids.shape) == step.shape
            if several and bool(visual_token_mask(ids, self.facts).any()):  # read for multi-token steps only
                raise ValueError(
                    "visual tokens arrived after the prefill (a chunked prefill, generate(..., "
                    "prefill_chunk_size=...), or a follow-up turn with an image); visual-token exit "
                    "withdraws them at prefill only: drop prefill_chunk_size, or start a new cache"
                )
            return TokenExit(None, step, None, attention_mask) if state.segments else None
        if ids is None or tuple(ids.shape) != step.shape:
            raise ValueError(
                "visual-token exit finds the image tokens from input_ids; call the model with input_ids "
                "(not inputs_embeds), or apply the plan with skipvlm.apply_plan on the full model"
            )
        visual = visual_token_mask(ids, self.facts)
        return TokenExit(self.policy(ids.device), step, visual, attention_mask)


class TokenExit:
    """One forward's visual-token exit.

    Args:
        policy: the plan's method (None while decoding).
        step: the forward's step; its frame is switched to each new layout.
        visual: (B, T) bool, the visual positions (prefill; None while decoding).
        attention_mask: the 2-D (B, T) mask given to the forward, or None.
    """

    def __init__(self, policy: Policy | None, step: Step, visual: torch.Tensor | None, attention_mask: Any):
        self.policy = policy
        self.step = step
        self.root = step.frame  # the forward's own frame
        self.num_layers = len(step.attends)
        self.visual = visual
        self.attention_mask = attention_mask
        self._home: torch.Tensor | None = None  # (B, T, C): the latest state of every position
        self.decoding = visual is None
        self.exit_layers: list[int] | None = None
        if self.decoding:
            self.state = step.memory.token_exit
            self._by_start = {s.start: s for s in self.state.segments}
            return
        real = torch.ones_like(visual) if attention_mask is None else attention_mask.bool()
        self.keep = real  # (B, T): positions in the current layout (padding included at first)
        self.real = real
        self.state = ExitState([], [self.num_layers] * visual.shape[0])
        self.exit_layers = self.state.exit_layers
        step.memory.token_exit = self.state

    @property
    def frame(self) -> Frame:
        """The current layout."""
        return self.step.frame

    # --- prefill -------------------------------------------------------------------------------

    def _relayout(self, i: int, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is not None and not bool(self.attention_mask[:, -1].all()):
            raise ValueError(
                "visual-token exit needs left-padded batches (the last position of every row is a real "
                "token); set tokenizer.padding_side = 'left'"
            )
        cache = self.step.cache
        if cache is not None and not any(self.step.attends[:i]):
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
        if cache is not None:
            view = DynamicCache()
            view.layers = [DummyLayer() for _ in range(i)] + list(cache.layers[i:])
        mask2d = mask.long()
        self.state.segments.append(_Segment(i, view, mask2d))
        build = self.step.build_masks
        self.step.frame = Frame(
            index,
            mask,
            text_ids,
            rope_ids,
            self.step.rotary(hidden, rope_ids),
            lambda: build(mask2d, hidden, view),
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

    def before_layer(self, i: int, hidden: torch.Tensor, step: Step) -> torch.Tensor:
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
        root, build = self.root, self.step.build_masks
        self.step.frame = Frame(
            None,
            None,
            root.text_ids,
            root.rope_ids,
            root.position_embeddings,
            lambda: build(mask2d, hidden, view),
        )

    def expand(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states at every original position (withdrawn ones keep their exit-time state)."""
        if self.frame.index is None:
            return hidden
        return scatter_tokens(self._home, hidden, self.frame.index, self.frame.mask)
