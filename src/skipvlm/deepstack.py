"""Qwen3-VL's DeepStack as a hook of skipvlm's layer loop.

Qwen3-VL's vision tower hands its text model, besides the visual tokens, one feature tensor per early
decoder layer (``deepstack_visual_embeds[i]``, (N_visual, C), the visual positions of the batch in
row-major order) and the (B, T) mask of those positions (``visual_pos_masks``). The stock loop adds
feature ``i`` to the hidden states at the visual positions right after decoder layer ``i``:

    h = layer_i(h);   h[visual] += deepstack[i]          for i < len(deepstack)

skipvlm's loop does the same after every layer's *route*, whatever the route is (a skipped attention,
MLP or whole layer still gets the addition, as the stock model with that module's output projection
zeroed does). Under visual-token exit (``shared/METHODS.md`` §4) the layers run on a packed layout of
the remaining tokens; the addition then goes to the visual tokens still present, each getting its own
feature: a packed layout keeps the order of the positions within a row, so the present visual slots,
read row by row, are the original visual positions that remain, in the order of the features. This is
exactly what the stock model computes for those tokens when the withdrawn ones are masked out of
attention from the exit layer on (the masked reference of the token-exit tests).
"""

from __future__ import annotations

from typing import Any

import torch

from skipvlm import compat

__all__ = ["DeepStack", "take_deepstack"]


class DeepStack:
    """One forward's DeepStack additions (a :class:`~skipvlm.arch.LayerHook`).

    Args:
        visual: (B, T) bool, the visual positions of the forward's input.
        features: per early layer, (N_visual, C) features of those positions in row-major order.
    """

    def __init__(self, visual: torch.Tensor, features: list[torch.Tensor] | tuple[torch.Tensor, ...]):
        count = int(visual.sum())
        for i, f in enumerate(features):
            if f.shape[0] != count:
                raise ValueError(
                    f"DeepStack features of layer {i} hold {f.shape[0]} visual tokens but "
                    f"{compat.DEEPSTACK_MASK_KWARG} marks {count}; pass the features and mask the model "
                    "computed together"
                )
        self.visual = visual.bool()
        self.features = list(features)

    def after_layer(
        self, i: int, h: torch.Tensor, index: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``h`` after layer ``i``, with layer ``i``'s features added at the visual tokens present.

        Args:
            i: the decoder layer that just ran.
            h: (B, T', C) its output on the current layout.
            index, mask: the current layout (:class:`~skipvlm.routes.Frame`); None for the original one.
        """
        if i >= len(self.features):
            return h
        visual = self.visual.to(h.device)
        feature = self.features[i].to(h.device, h.dtype)
        if index is not None:  # a packed layout: the visual slots present, and which features they hold
            present = torch.zeros_like(visual)
            rows, slots = mask.nonzero(as_tuple=True)
            present[rows, index[rows, slots]] = True
            feature = feature[present[visual]]
            visual = visual.gather(1, index) & mask  # (B, T')
        h = h.clone()
        h[visual] = h[visual] + feature
        return h


def take_deepstack(kwargs: dict[str, Any]) -> DeepStack | None:
    """Take the DeepStack keywords out of a text model's ``kwargs``; the forward's hook, or None when it
    carries no visual features (a text-only prompt, or a decoding step)."""
    visual = kwargs.pop(compat.DEEPSTACK_MASK_KWARG, None)
    features = kwargs.pop(compat.DEEPSTACK_EMBEDS_KWARG, None)
    if features is None:
        return None
    if visual is None:
        raise ValueError(
            f"{compat.DEEPSTACK_EMBEDS_KWARG} came without {compat.DEEPSTACK_MASK_KWARG}, the mask of the "
            "positions they are added to; pass both"
        )
    return DeepStack(visual, features)
