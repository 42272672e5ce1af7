"""The trainable modules of one stream of one co-attention layer (``shared/METHODS.md`` §2, §3, §7).

Post-norm sublayers ``h <- LN(h + Sub(h))`` take PIA as follows (``x = h``: there is no pre-norm):

* replace-PIA in a skipped attention sublayer: ``h <- LN(h + PIA(h))`` with
  ``PIA(x)_n = s * sum_k w_k (U_k 0.5 Dropout(g + W_C x_n + b_C) + c_k)``, ``g = W_A p + b_A``,
  ``w = softmax(W_r p / tau)``; ``p`` pools the tokens the skipped sublayer attended to (its own
  stream's non-padding tokens for self-attention, the other stream's for cross-attention). ``U_k``
  and ``c_k`` start at zero, so a fresh PIA is the plain skip ``h <- LN(h)``.
* adapt-PIA in a kept attention sublayer, on its query input only (the residual stays ``h``):
  ``h <- LN(h + O(Attn(y, kv)))``, ``y_n = x_n + s * sum_k w_k (U_k Dropout(W_A x_n + b_A) + c_k)``,
  ``p`` pooled as for replace-PIA.
* DAS: a whole co-attention layer skipped becomes, per stream, ``h <- h + A(h)`` with the ReLU bottleneck
  ``A`` (zero-initialised up-projection: a fresh one skips the layer plainly, ``h <- h``).
"""

from __future__ import annotations

import torch
from torch import nn

from skipvlm.pia import AdaptPIA, BottleneckAdapter, ReplacePIA

__all__ = ["EncoderPIA", "StreamAdapters"]


class EncoderPIA(ReplacePIA):
    """Replace-PIA for a post-norm sublayer: :meth:`delta` is ``PIA(x)``, what is added before the norm."""

    def delta(self, x: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """``s * sum_k w_k (U_k 0.5 Dropout(g + W_C x_n + b_C) + c_k)``.

        x (B, T, C), pooled (B, C) -> (B, T, C)."""
        w = self.route(pooled)  # (B, 2)
        g = self.pooled_path(pooled)  # (B, d)
        h = 0.5 * self.dropout(g[:, None, :] + self.token(x))  # (B, T, d)
        return self.scale * self._mix(w, h)


class StreamAdapters(nn.Module):
    """The adapters of one stream of one co-attention layer.

    Args:
        hidden_size: C.
        replace: attention sublayers (``"self"``, ``"cross"``) that get a replace-PIA (bottleneck
            ``replace_dim``).
        adapt: attention sublayers that get an adapt-PIA (bottleneck ``adapt_dim``).
        das: give the stream a DAS bottleneck adapter (width ``replace_dim``).
        replace_dim / adapt_dim / groups / scale / temperature / dropout: the PIA settings (METHODS §2).
    """

    def __init__(
        self,
        hidden_size: int,
        replace: tuple[str, ...] = (),
        adapt: tuple[str, ...] = (),
        das: bool = False,
        replace_dim: int = 144,
        adapt_dim: int = 8,
        groups: int = 2,
        scale: float = 1.0,
        temperature: float = 10.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        kw = dict(groups=groups, scale=scale, temperature=temperature, dropout=dropout)
        self.replace = nn.ModuleDict({k: EncoderPIA(hidden_size, replace_dim, **kw) for k in replace})
        self.adapt = nn.ModuleDict({k: AdaptPIA(hidden_size, adapt_dim, **kw) for k in adapt})
        if das:
            self.das = BottleneckAdapter(hidden_size, replace_dim, dropout)

    @property
    def has_das(self) -> bool:
        return "das" in self._modules
