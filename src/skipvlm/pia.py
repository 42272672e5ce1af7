"""PIA, the propagation-of-information adapter, and its exact collapse to an affine map.

``shared/METHODS.md`` §2. Two linear bottlenecks with no activation read ``x_n = N_in(h)_n`` and a
pooled prompt vector ``p = sum_n q_n x_n`` (``q``: normalised mask over prompt tokens only). A router
``w = softmax(W_r p / tau)`` mixes two block-diagonal up-projections ``U_1, U_2`` (G groups, biases
``c_1, c_2``):

* adapt-PIA (kept layers, on the attention input):
  ``y_n = x_n + s * sum_k w_k (U_k Dropout(W_A x_n + b_A) + c_k)``
* replace-PIA (layers whose attention is skipped; its output feeds the MLP through gamma_post):
  ``g = W_A p + b_A``, ``y_n = x_n + s * sum_k w_k (U_k 0.5 Dropout(g + W_C x_n + b_C) + c_k)``
* FFN-PIA (a skipped MLP replaced, the paper's FFN rows): the replace-PIA's residual branch alone,
  ``F(x_n) = y_n - x_n = s * sum_k w_k (U_k 0.5 Dropout(g + W_C x_n + b_C) + c_k)``
  (:meth:`ReplacePIA.residual`; the route adds it to the residual stream, see :mod:`skipvlm.adapters`).

The design ablations of the paper's PIA table are constructor switches: ``paths=1`` keeps one
up-projection and no router (``w = (1,)``, the "Base" row), and ``info_exchange=False`` drops the
replace-PIA's pooled path (``g = 0``, no ``W_A``). Both keep PIA affine.

With ``w`` and ``g`` frozen every kind is affine, ``y = (I + U V) x + r``; :func:`collapse_adapt` and
:func:`collapse_replace` return that map in low-rank form and :func:`fold_into_linear` merges it into
a following linear layer without ever forming a dense C x C matrix. Module code here is pure: no
file I/O, no model surgery (that is :mod:`skipvlm.merge` and the EAS model's job).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skipvlm.data.labels import IGNORE_INDEX

__all__ = [
    "AdaptPIA",
    "AffineMap",
    "BlockDiagonalLinear",
    "BottleneckAdapter",
    "FrozenPIA",
    "ReplacePIA",
    "collapse_adapt",
    "collapse_replace",
    "fold_into_linear",
    "pooled_prompt",
    "prompt_mask_from_labels",
]


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


def _route(
    weight: torch.Tensor, bias: torch.Tensor, pooled: torch.Tensor, temperature: float
) -> torch.Tensor:
    return torch.softmax(nn.functional.linear(pooled, weight, bias) / temperature, dim=-1)


def _down_projection(hidden_size: int, rank: int) -> nn.Linear:
    """A C -> d projection initialised as the spec says: xavier-uniform weight, zero bias."""
    lin = nn.Linear(hidden_size, rank)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class PIABase(nn.Module):
    """Router and the routed up-projections shared by every PIA kind.

    Args:
        hidden_size: C.
        rank: bottleneck d.
        groups, scale, temperature, dropout: G, s, tau and the dropout rate of the spec.
        paths: up-projections K: 2 (the spec: routed by ``w = softmax(W_r p / tau)``) or 1 (no router,
            ``w = (1,)``: the "Base" row of the paper's PIA design table).
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        groups: int = 2,
        scale: float = 1.0,
        temperature: float = 10.0,
        dropout: float = 0.0,
        paths: int = 2,
    ):
        super().__init__()
        if rank < groups or rank % groups:
            raise ValueError(f"adapter rank {rank} must be a positive multiple of groups={groups}")
        if temperature <= 0:
            raise ValueError(f"router temperature must be > 0, got {temperature}")
        if paths not in (1, 2):
            raise ValueError(f"a PIA has 1 or 2 up-projection paths, got paths={paths}")
        self.hidden_size, self.rank, self.scale, self.temperature = hidden_size, rank, scale, temperature
        self.up = nn.ModuleList([BlockDiagonalLinear(rank, hidden_size, groups) for _ in range(paths)])
        self.router = nn.Linear(hidden_size, paths) if paths > 1 else None
        self.dropout = nn.Dropout(dropout)
        # Calibration means of the router weights over training prompts (the `static` merge uses
        # them). Running means, so a low-precision dtype never accumulates a large sum; the count is
        # an integer buffer, which dtype casts leave alone.
        self.register_buffer("calib_w", torch.zeros(paths))
        self.register_buffer("calib_n", torch.zeros((), dtype=torch.long))

    @property
    def paths(self) -> int:
        return len(self.up)

    def route(self, pooled: torch.Tensor) -> torch.Tensor:
        """Router weights ``w = softmax(W_r p / tau)``: (B, C) -> (B, K); ``w = 1`` with one path."""
        if self.router is None:
            return pooled.new_ones(pooled.shape[0], 1)
        return _route(self.router.weight, self.router.bias, pooled, self.temperature)

    def _mix(self, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``sum_k w_k (U_k h + c_k)`` for h (B, T, d) and w (B, K) -> (B, T, C)."""
        return sum(w[:, k, None, None] * up(h) for k, up in enumerate(self.up))

    def mixed_up(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For one example's router weights w (K,): ``M = sum_k w_k U_k`` (C, d) and ``c = sum_k w_k c_k``."""
        return _mix_up(self.up_weight(), torch.stack([up.bias for up in self.up]), w)

    def up_weight(self) -> torch.Tensor:
        """The block-diagonal up-projections' blocks stacked: (K, G, C/G, d/G)."""
        return torch.stack([up.weight for up in self.up])

    @torch.no_grad()
    def record(self, w: torch.Tensor, g: torch.Tensor | None = None) -> None:
        """Fold a batch of router weights w (B, K) (and pooled paths g (B, d)) into the calibration means."""
        n, b = int(self.calib_n), w.shape[0]
        self.calib_w += (w.mean(0).to(self.calib_w.dtype) - self.calib_w) * (b / (n + b))
        if g is not None:
            self.calib_g += (g.mean(0).to(self.calib_g.dtype) - self.calib_g) * (b / (n + b))
        self.calib_n += b

    def reset_calibration(self) -> None:
        """Forget the calibration means."""
        for buf in (self.calib_w, getattr(self, "calib_g", None), self.calib_n):
            if buf is not None:
                buf.zero_()


class AdaptPIA(PIABase):
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


class ReplacePIA(PIABase):
    """Replace-PIA in a layer whose attention is skipped; ``out = h + MLP(gamma_post * y)``.

    ``g = W_A p + b_A`` (pooled path), ``y = x + s sum_k w_k (U_k 0.5 D(g + W_C x + b_C) + c_k)``.
    The same module, its residual branch ``F(x) = y - x`` alone, is the FFN-PIA that replaces a
    skipped MLP (:meth:`residual`).

    Args:
        hidden_size: C.
        rank: bottleneck d_r.
        info_exchange: keep the pooled path (the spec); False: ``g = 0`` and no ``W_A`` (the "Info.
            Exc." ablation).
        groups, scale, temperature, dropout, paths: as :class:`PIABase`.
    """

    def __init__(self, hidden_size: int, rank: int, info_exchange: bool = True, **kwargs):
        super().__init__(hidden_size, rank, **kwargs)
        self.pool = _down_projection(hidden_size, rank) if info_exchange else None  # W_A, b_A
        self.token = _down_projection(hidden_size, rank)  # W_C, b_C
        self.register_buffer("calib_g", torch.zeros(rank))  # calibration mean of g = W_A p + b_A

    def pooled_path(self, pooled: torch.Tensor) -> torch.Tensor:
        """``g = W_A p + b_A``: (B, C) -> (B, d); zeros without information exchange."""
        if self.pool is None:
            return pooled.new_zeros(pooled.shape[0], self.rank)
        return self.pool(pooled)

    def residual(
        self,
        x: torch.Tensor,
        pooled: torch.Tensor | None,
        w: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``F(x) = s sum_k w_k (U_k 0.5 D(g + W_C x + b_C) + c_k)``: x (B, T, C) -> (B, T, C). Pass ``w`` /
        ``g`` to use frozen values (then ``pooled`` may be None)."""
        w = self.route(pooled) if w is None else w
        g = self.pooled_path(pooled) if g is None else g
        h = 0.5 * self.dropout(g[:, None, :] + self.token(x))  # (B, T, d)
        return self.scale * self._mix(w, h)

    def forward(
        self,
        x: torch.Tensor,
        pooled: torch.Tensor | None,
        w: torch.Tensor | None = None,
        g: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C), pooled (B, C) -> y = x + F(x) (B, T, C). Pass ``w`` / ``g`` to use frozen values."""
        return x + self.residual(x, pooled, w, g)


class BottleneckAdapter(nn.Module):
    """The DAS baseline's layer replacement ``A(x) = W_up ReLU(W_down x + b_down) + b_up`` (METHODS §3).

    A layer skipped whole becomes ``h + A(N_in(h))``. ``W_up`` and ``b_up`` start at zero, so a fresh
    adapter skips the layer plainly. The ReLU makes it non-affine: it cannot be merged into weights.
    """

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.down = _down_projection(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x))))


class FrozenPIA(nn.Module):
    """A trained PIA's tensors as non-trainable, non-persistent buffers, kept to merge per example.

    It never runs on tokens: :meth:`route`, :meth:`pooled_path` and :meth:`collapse` give what a
    per-example merge needs from one pooled prompt vector.
    """

    def __init__(self, adapter: AdaptPIA | ReplacePIA):
        super().__init__()
        self.is_replace = isinstance(adapter, ReplacePIA)
        self.scale, self.temperature = adapter.scale, adapter.temperature
        down = adapter.token if self.is_replace else adapter.down
        self.routed = adapter.router is not None
        self.pooling = self.is_replace and adapter.pool is not None
        tensors = {
            "up_weight": adapter.up_weight(),
            "up_bias": torch.stack([up.bias for up in adapter.up]),
            "down_weight": down.weight,
            "down_bias": down.bias,
        }
        if self.routed:
            tensors |= {"router_weight": adapter.router.weight, "router_bias": adapter.router.bias}
        if self.pooling:
            tensors |= {"pool_weight": adapter.pool.weight, "pool_bias": adapter.pool.bias}
        for name, t in tensors.items():
            self.register_buffer(name, t.detach().clone(), persistent=False)

    def route(self, pooled: torch.Tensor) -> torch.Tensor:
        """``w = softmax(W_r p / tau)``: (B, C) -> (B, K); ``w = 1`` with one path."""
        if not self.routed:
            return pooled.new_ones(pooled.shape[0], 1)
        return _route(self.router_weight, self.router_bias, pooled, self.temperature)

    def pooled_path(self, pooled: torch.Tensor) -> torch.Tensor:
        """``g = W_A p + b_A``: (B, C) -> (B, d) (replace-PIA only; zeros without information exchange)."""
        if not self.pooling:
            return pooled.new_zeros(pooled.shape[0], self.down_weight.shape[0])
        return nn.functional.linear(pooled, self.pool_weight, self.pool_bias)

    def collapse(self, w: torch.Tensor, g: torch.Tensor | None = None) -> AffineMap:
        """The affine map of this adapter for one example's w (K,) and, for replace-PIA, g (d,)."""
        shift = g + self.down_bias if self.is_replace else self.down_bias
        return _affine(
            self.up_weight, self.up_bias, w, self.down_weight, shift, self.scale, half=self.is_replace
        )


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


def _mix_up(
    up_weight: torch.Tensor, up_bias: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``M = sum_k w_k blockdiag(U_k)`` (C, d) and ``c = sum_k w_k c_k`` (C,) from stacked blocks.

    up_weight (K, G, C/G, d/G), up_bias (K, C), w (K,) (K = 2 routed paths, or 1).
    """
    blocks = torch.einsum("k,kgoi->goi", w.to(up_weight.dtype), up_weight)  # (G, C/G, d/G)
    return torch.block_diag(*blocks), w.to(up_bias.dtype) @ up_bias


def _affine(
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    w: torch.Tensor,
    down_weight: torch.Tensor,
    shift: torch.Tensor,
    scale: float,
    half: bool,
) -> AffineMap:
    """``y = x + s sum_k w_k (U_k f (V x + shift) + c_k)`` as an :class:`AffineMap`, f = 0.5 or 1."""
    m, c = _mix_up(up_weight, up_bias, w)
    f = 0.5 if half else 1.0
    return AffineMap(U=scale * f * m, V=down_weight, r=scale * f * (m @ shift) + scale * c)


def collapse_adapt(adapter: AdaptPIA, w: torch.Tensor) -> AffineMap:
    """Adapt-PIA with router weights w (K,) frozen: ``R = I + s M W_A``, ``r = s (M b_A + c)``."""
    up_bias = torch.stack([up.bias for up in adapter.up])
    down = adapter.down
    return _affine(adapter.up_weight(), up_bias, w, down.weight, down.bias, adapter.scale, half=False)


def collapse_replace(adapter: ReplacePIA, w: torch.Tensor, g: torch.Tensor) -> AffineMap:
    """Replace-PIA with w (K,) and g (d,) frozen: ``R = I + (s/2) M W_C``, ``r = (s/2) M (g + b_C) + s c``.

    As an FFN-PIA the same map minus the identity is the branch: ``F(x) = U V x + r``."""
    up_bias = torch.stack([up.bias for up in adapter.up])
    token = adapter.token
    return _affine(adapter.up_weight(), up_bias, w, token.weight, g + token.bias, adapter.scale, half=True)


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
