"""One stream of one co-attention layer, run under a plan (``shared/METHODS.md`` §7).

A stock co-attention layer (transformers' ``BridgeTowerBertCrossLayer``) of stream ``s`` with input ``h``
(B, T_s, C) and the other stream's input ``e`` (B, T_o, C) computes, BERT-style post-norm:

    a   = LN_self (h + O_self (Attn(h, h)))          attention.self / attention.output
    b   = LN_cross(a + O_cross(Attn(a, e)))          crossattention.self / crossattention.output
    out = LN_ffn  (b + W_2 act(W_1 b))               intermediate / output

:class:`CoLayer` stands where that layer was (its children registered under their own names, so
state-dict keys never change) and runs the stock sub-modules, except that, per the plan:

* a skipped attention sublayer runs no q/k/v/o projection and no attention kernel:
  ``a = LN_self(h)`` (plain; equal to the stock layer with ``O_self`` weight and bias zeroed) or
  ``a = LN_self(h + PIA(h))`` with a replace-PIA (:mod:`skipvlm.encoders.adapters`); likewise ``b``;
* a skipped FFN runs neither projection: ``out = LN_ffn(b)``;
* a kept attention with an adapt-PIA attends from ``y = AdaptPIA(h)`` (queries only; the residual and
  the keys / values are unchanged);
* a layer with a DAS adapter whose six sublayers are all skipped is ``out = h + A(h)``.

The pooled vectors PIA reads are masked means: over the stream's own non-padding tokens for a
self-attention, over the other stream's for a cross-attention (its keys / values source). The text
stream's padding is read from the layer's attention masks (the image stream is never padded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from skipvlm.encoders.adapters import StreamAdapters
from skipvlm.pia import pooled_prompt
from skipvlm.runtime import StockWrapper

__all__ = ["SUBLAYERS", "CoLayer", "key_mask"]

SUBLAYERS = ("self", "cross", "ffn")


def key_mask(mask: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens of ``x`` (B, T, C) a bidirectional attention mask lets queries attend to.

    ``mask`` is what the stock model hands the layer: None (every token), a boolean (B, 1, Q, T) mask
    (True: attend) or an additive float one (0: attend, a large negative number: masked).

    Raises:
        TypeError: another mask form (e.g. flex attention's BlockMask).
    """
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(
            f"cannot read the padding from a {type(mask).__name__} attention mask; run the model with "
            "attn_implementation='eager' or 'sdpa'"
        )
    row = mask[:, 0, 0, :]  # (B, T): a bidirectional mask's rows are all alike
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2


class CoLayer(StockWrapper):
    """Runs one stream's co-attention layer under a plan; built by the encoder host's ``apply_plan``.

    Args:
        base: the stock ``BridgeTowerBertCrossLayer``.
        stream: ``"text"`` or ``"image"``.
        index: the co-attention layer.
    """

    def __init__(self, base: nn.Module, stream: str, index: int):
        super().__init__(base)
        object.__setattr__(self, "stream", stream)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "skips", frozenset())
        object.__setattr__(self, "das", False)

    def attach(self, adapters: StreamAdapters | None) -> None:
        """Hold ``adapters`` (None: drop them); the skips are checked again by :meth:`set_skips`."""
        if adapters is None:
            self._modules.pop("adapters", None)
            self._own.discard("adapters")
        else:
            self.adapters = adapters
            self._own.add("adapters")

    @property
    def held(self) -> StreamAdapters | None:
        """The adapters this layer holds, or None."""
        return self._modules.get("adapters")

    def set_skips(self, skips: frozenset[str], das: bool = False) -> None:
        """Skip the sublayers in ``skips`` (of ``self``, ``cross``, ``ffn``) from now on.

        Args:
            skips: the sublayers skipped.
            das: the plan skips this layer whole as DAS (the layer then needs its DAS adapter).

        Raises:
            ValueError: see :meth:`check_skips`.
        """
        self.check_skips(skips, das)
        object.__setattr__(self, "skips", frozenset(skips))
        object.__setattr__(self, "das", bool(das))

    def check_skips(self, skips: frozenset[str], das: bool = False) -> None:
        """Raise ValueError (naming the layer and the fix) when an adapter the skips need is missing: a
        DAS adapter for ``das``; a replace-PIA for a skipped attention of a layer that holds replace-PIAs
        for others (a layer without any runs the plain skip)."""
        held = self.held
        name = f"{self.stream}.{self.index}"
        if das and (held is None or not held.has_das):
            raise ValueError(
                f"co-attention layer {self.index} ({self.stream} stream) has no DAS adapter; build the EAS "
                "model with skip_layers including it, or supernet=True with candidates='layer'"
            )
        if held is not None and not (das and held.has_das):
            missing = [k for k in ("self", "cross") if k in skips and k not in held.replace]
            if missing and held.replace:
                raise ValueError(
                    f"{', '.join(f'{name}.{k}' for k in missing)} has no replace-PIA; build the EAS model "
                    "with that sublayer in skip_attention, or supernet=True to move skips anywhere"
                )

    @property
    def is_stock(self) -> bool:
        """True when the layer computes exactly the stock layer (nothing skipped, no adapter)."""
        return not self.skips and self.held is None

    # --- the forward ---------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: Any = None,
        encoder_attention_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The stock layer's signature and output ``(out, self weights, cross weights)`` (weights are None
        for a skipped attention)."""
        h, e = hidden_states, encoder_hidden_states
        held = self.held
        if self.das:  # DAS: out = h + A(h)
            return h + held.das(h), None, None
        pooled = _Pools(h, e, attention_mask, encoder_attention_mask)
        a, w_self = self._attention("self", h, pooled.own, attention_mask=attention_mask, **kwargs)
        b, w_cross = self._attention(
            "cross",
            a,
            pooled.other,
            attention_mask=attention_mask,
            encoder_hidden_states=e,
            encoder_attention_mask=encoder_attention_mask,
            **kwargs,
        )
        if "ffn" in self.skips:
            return self.output.LayerNorm(b), w_self, w_cross  # LN_ffn(b)
        return self.output(self.intermediate(b), b), w_self, w_cross  # LN_ffn(b + W_2 act(W_1 b))

    def _attention(
        self, kind: str, h: torch.Tensor, pool: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One attention sublayer (``kind``: ``self`` or ``cross``) on ``h``: stock, adapted or skipped."""
        module = self.attention if kind == "self" else self.crossattention
        held = self.held
        if kind in self.skips:
            if held is not None and kind in held.replace:  # LN(h + PIA(h))
                return module.output.LayerNorm(h + held.replace[kind].delta(h, pool())), None
            return module.output.LayerNorm(h), None  # LN(h)
        if held is None or kind not in held.adapt:
            return module(h, cache=None, **kwargs)  # the stock sublayer: LN(h + O(Attn(h, .)))
        y = held.adapt[kind](h, pool())  # queries from y, residual h: LN(h + O(Attn(y, .)))
        mask = kwargs["attention_mask"] if kind == "self" else kwargs["encoder_attention_mask"]
        rest = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "encoder_attention_mask")}
        out, weights = module.self(y, attention_mask=mask, cache=None, **rest)
        return module.output(out, h), weights

    def extra_repr(self) -> str:
        skips = ",".join(k for k in SUBLAYERS if k in self.skips) or "none"
        return f"stream={self.stream}, layer={self.index}, skip={skips}" + (", das" if self.das else "")


class _Pools:
    """The pooled vectors of one forward, computed on first use: ``own()`` over the stream's non-padding
    tokens, ``other()`` over the other stream's."""

    def __init__(self, h: torch.Tensor, e: torch.Tensor, own_mask: Any, other_mask: Any):
        self._h, self._e, self._own_mask, self._other_mask = h, e, own_mask, other_mask

    def own(self) -> torch.Tensor:
        return pooled_prompt(self._h, key_mask(self._own_mask, self._h))

    def other(self) -> torch.Tensor:
        return pooled_prompt(self._e, key_mask(self._other_mask, self._e))
