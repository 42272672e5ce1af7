"""PIA, the propagation-of-information adapter, and its exact collapse to an affine map.

``shared/METHODS.md`` §2. Two linear bottlenecks with no activation read ``x_n = N_in(h)_n`` and a
pooled prompt vector ``p = sum_n q_n x_n`` (``q``: normalised mask over prompt tokens only). A router
``w = softmax(W_r p / tau)`` mixes two block-diagonal up-projections ``U_1, U_2`` (G groups, biases
``c_1, c_2``):

* adapt-PIA (kept layers, on the attention input):
  ``y_n = x_n + s * sum_k w_k (U_k Dropout(W_A x_n + b_A) + c_k)``
* replace-PIA (layers whose attention is skipped; its output feeds the MLP through gamma_post):
  ``g = W_A p + b_A``, ``y_n = x_n + s * sum_k w_k (U_k 0.5 Dropout(g + W_C x_n + b_C) + c_k)``

With ``w`` and ``g`` frozen both are affine, ``y = (I + U V) x + r``; :func:`collapse_adapt` and
:func:`collapse_replace` return that map in low-rank form and :func:`fold_into_linear` merges it into
a following linear layer without ever forming a dense C x C matrix. Module code here is pure: no
file I/O, no model surgery (that is :mod:`skipvlm.merge` and the EAS model's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "AdaptPIA",
    "AffineMap",
    "BlockDiagonalLinear",
    "ReplacePIA",
    "collapse_adapt",
    "collapse_replace",
    "fold_into_linear",
    "pooled_prompt",
    "prompt_mask_from_labels",
]

IGNORE_INDEX = -100


class BlockDiagonalLinear(nn.Module):
    """``y = blockdiag(W_1, ..., W_G) x + b`` from ``in_features`` to ``out_features``; zero-initialised.

    Args:
        in_features: bottleneck width d (divisible by ``groups``).
        out_features: hidden size C (divisible by ``groups``).
        groups: number of diagonal blocks G.

    Raises:
        ValueError: a width is not divisible by ``groups``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 2):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if groups < 1 or value % groups:
                raise ValueError(f"{name}={value} must be divisible by groups={groups}")
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.weight = nn.Parameter(torch.zeros(groups, out_features // groups, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.unflatten(-1, (self.groups, -1))  # (..., G, d/G)
        y = torch.einsum("...gi,goi->...go", xg, self.weight)  # (..., G, C/G)
        return y.flatten(-2) + self.bias  # (..., C)

    def dense(self) -> torch.Tensor:
        """The (C, d) block-diagonal matrix."""
        return torch.block_diag(*self.weight)


def _down_projection(hidden_size: int, rank: int) -> nn.Linear:
    """A C -> d projection initialised as the spec says: xavier-uniform weight, zero bias."""
    lin = nn.Linear(hidden_size, rank)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class _PIA(nn.Module):
    """Router and the two routed up-projections shared by both PIA kinds."""

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        groups: int = 2,
        scale: float = 1.0,
        temperature: float = 10.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if rank < groups or rank % groups:
            raise ValueError(f"adapter rank {rank} must be a positive multiple of groups={groups}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        self.hidden_size, self.rank, self.scale, self.temperature = hidden_size, rank, scale, temperature
        self.up = nn.ModuleList([BlockDiagonalLinear(rank, hidden_size, groups) for _ in range(2)])
        self.router = nn.Linear(hidden_size, 2)
        self.dropout = nn.Dropout(dropout)

    def route(self, pooled: torch.Tensor) -> torch.Tensor:
        """Router weights ``w = softmax(W_r p / tau)``: (B, C) -> (B, 2)."""
        return torch.softmax(self.router(pooled) / self.temperature, dim=-1)

    def _mix(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k (U_k h + c_k)`` for h (B, T, d) and w (B, 2) -> (B, T, C)."""
        return sum(w[:, k, None, None] * up(h) for k, up in enumerate(self.up))

    def mixed_up(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For one example's router weights w (2,): ``M = sum_k w_k U_k`` (C, d) and ``c = sum_k w_k c_k``."""
        m = sum(w[k] * up.dense() for k, up in enumerate(self.up))
        c = sum(w[k] * up.bias for k, up in enumerate(self.up))
        return m, c


class AdaptPIA(_PIA):
    """Adapt-PIA on the attention input of a kept layer: ``y = x + s sum_k w_k (U_k D(W_A x + b_A) + c_k)``.

    Args:
        hidden_size: C.
        rank: bottleneck d_a.
        groups, scale, temperature, dropout: G, s, tau and the dropout rate of the spec.
    """

    def __init__(self, hidden_size: int, rank: int, **kwargs):
        super().__init__(hidden_size, rank, **kwargs)
        self.down = _down_projection(hidden_size, rank)  # W_A, b_A

    def forward(self, x: torch.Tensor, pooled: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C), pooled (B, C) -> y (B, T, C). Pass ``w`` to use frozen router weights."""
        w = self.route(pooled) if w is None else w
        return x + self.scale * self._mix(w, self.dropout(self.down(x)))


class ReplacePIA(_PIA):
    """Replace-PIA in a layer whose attention is skipped; ``out = h + MLP(gamma_post * y)``.

    ``g = W_A p + b_A`` (pooled path), ``y = x + s sum_k w_k (U_k 0.5 D(g + W_C x + b_C) + c_k)``.

    Args:
        hidden_size: C.
        rank: bottleneck d_r.
        groups, scale, temperature, dropout: G, s, tau and the dropout rate of the spec.
    """

    def __init__(self, hidden_size: int, rank: int, **kwargs):
        super().__init__(hidden_size, rank, **kwargs)
        self.pool = _down_projection(hidden_size, rank)  # W_A, b_A
        self.token = _down_projection(hidden_size, rank)  # W_C, b_C

    def pooled_path(self, pooled: torch.Tensor) -> torch.Tensor:
        """``g = W_A p + b_A``: (B, C) -> (B, d)."""
        return self.pool(pooled)

    def forward(
        self,
        x: torch.Tensor,
        pooled: torch.Tensor,
        w: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C), pooled (B, C) -> y (B, T, C). Pass ``w`` / ``g`` to use frozen values."""
        w = self.route(pooled) if w is None else w
        g = self.pooled_path(pooled) if g is None else g
        h = 0.5 * self.dropout(g[:, None, :] + self.token(x))  # (B, T, d)
        return x + self.scale * self._mix(w, h)


# --- prompt pooling ------------------------------------------------------------------------------------


def prompt_mask_from_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Prompt tokens of a training batch: those before each row's first supervised label, padding excluded.

    A row with no supervised label counts all its non-padding tokens as prompt.

    Args:
        labels: (B, T) token labels, ``ignore_index`` where unsupervised (aligned with input_ids).
        attention_mask: (B, T), 0 on padding.

    Returns:
        (B, T) bool mask.
    """
    supervised = labels != ignore_index
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    first = torch.where(supervised, positions, labels.shape[1]).min(dim=1, keepdim=True).values
    mask = positions < first
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    return mask


def pooled_prompt(x: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
    """``p = sum_n q_n x_n`` with q the prompt mask normalised per example: (B, T, C) -> (B, C).

    Raises:
        ValueError: an example has no prompt token (the message names it).
    """
    q = prompt_mask.to(x.dtype)
    counts = q.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        empty = (counts[:, 0] == 0).nonzero().flatten().tolist()
        raise ValueError(f"example(s) {empty} have no prompt token to pool; each prompt needs >= 1 token")
    return torch.einsum("bt,btc->bc", q / counts, x)


# --- exact collapse and merge -------------------------------------------------------------------------


@dataclass
class AffineMap:
    """``y = R x + r`` with ``R = I + U V`` kept in low-rank form: U (C, d), V (d, C), r (C,)."""

    U: torch.Tensor
    V: torch.Tensor
    r: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x @ self.V.T) @ self.U.T + self.r


def collapse_adapt(adapter: AdaptPIA, w: torch.Tensor) -> AffineMap:
    """Adapt-PIA with router weights w (2,) frozen: ``R = I + s M W_A``, ``r = s (M b_A + c)``."""
    m, c = adapter.mixed_up(w)
    s = adapter.scale
    return AffineMap(U=s * m, V=adapter.down.weight, r=s * (m @ adapter.down.bias + c))


def collapse_replace(adapter: ReplacePIA, w: torch.Tensor, g: torch.Tensor) -> AffineMap:
    """Replace-PIA with w (2,) and g (d,) frozen: ``R = I + (s/2) M W_C``, ``r = (s/2) M (g + b_C) + s c``."""
    m, c = adapter.mixed_up(w)
    s = adapter.scale
    return AffineMap(U=0.5 * s * m, V=adapter.token.weight, r=0.5 * s * m @ (g + adapter.token.bias) + s * c)


def fold_into_linear(
    weight: torch.Tensor,
    affine: AffineMap,
    bias: torch.Tensor | None = None,
    pre_scale: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``z -> W (a * (R (b * z) + r)) + bias`` into one linear map ``z -> W' z + b'``.

    ``W' = W diag(a) R diag(b)`` and ``b' = W (a * r) + bias`` (the bias uses W, not W'), with a =
    ``pre_scale`` (gamma_post for replace-PIA) and b = ``post_scale`` (gamma_in). Computed as a low-rank
    update in float32, then cast back to ``weight``'s dtype.

    Returns:
        (W', b').

    Raises:
        ValueError: the merged weights are not finite.
    """
    dtype = weight.dtype
    f32 = {"dtype": torch.float32}
    wa = weight.to(**f32)
    if pre_scale is not None:
        wa = wa * pre_scale.to(**f32)[None, :]  # W diag(a): (out, C)
    v = affine.V.to(**f32)
    base = wa
    if post_scale is not None:
        b = post_scale.to(**f32)
        base, v = wa * b[None, :], v * b[None, :]
    new_weight = base + (wa @ affine.U.to(**f32)) @ v  # (out, d) @ (d, C): rank-d update
    new_bias = wa @ affine.r.to(**f32)
    if bias is not None:
        new_bias = new_bias + bias.to(**f32)
    if not (torch.isfinite(new_weight).all() and torch.isfinite(new_bias).all()):
        raise ValueError("merging the adapter produced non-finite weights; check the adapter for inf / NaN")
    return new_weight.to(dtype), new_bias.to(dtype)
