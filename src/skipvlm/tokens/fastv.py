"""FastV: keep the visual tokens that receive the most attention, from one layer on.

``shared/METHODS.md`` §4. Ranked by the attention they receive at layer K-1 from the last prompt token
(or, as an option, from every text token), averaged over heads; the top ``1 - R`` of each example's
visual tokens stay from layer K on. The attention row is recomputed from that layer's own q and k
projections (captured while it runs, so no projection runs twice), and the rest of the model keeps its
attention kernel: nothing is switched to eager attention.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from skipvlm.plan import PlanField, TokenExitMethod, exit_layer_value, fraction_value, register_token_exit
from skipvlm.tokens.exit import ExitRunner

__all__ = ["FastV", "received_attention"]

SOURCES = ("last", "text")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention each position receives, averaged over heads and over the chosen queries.

    Args:
        q: (B, T, H, D) query projections (before RoPE; after the q norm where the attention has one).
        k: (B, T, H_kv, D) key projections (before RoPE; after the k norm where the attention has one).
        cos, sin: (B, T, D) rotary tables of the positions.
        queries: (B, T) bool, the query positions to average over.
        keys: (B, T) bool, the positions that may be attended (real tokens).
        scaling: the attention's score scale (1 / sqrt(D)).
        window: a sliding-window layer's window (a query sees the ``window - 1`` positions before it).

    Returns:
        (B, T) fp32: mean attention received from the chosen queries (causal: a query sees itself and
        what precedes it).
    """
    batch, length, heads = q.shape[:3]
    group = heads // k.shape[2]
    cos, sin = cos[:, :, None].float(), sin[:, :, None].float()  # (B, T, 1, D)
    q = q.float() * cos + _rotate_half(q.float()) * sin
    k = k.float() * cos + _rotate_half(k.float()) * sin
    rows, cols = queries.nonzero(as_tuple=True)
    total = torch.zeros(batch, length, device=q.device)
    # One query row at a time per example keeps memory at (H, T) even when every text token asks.
    k_heads = k.repeat_interleave(group, dim=2).transpose(1, 2)  # (B, H, T, D)
    for b in rows.unique().tolist():
        pos = cols[rows == b]  # the query positions of example b
        scores = torch.einsum("qhd,htd->qht", q[b, pos], k_heads[b]) * scaling  # (Q, H, T)
        kv = torch.arange(length, device=q.device)[None, :]
        visible = keys[b][None, :] & (kv <= pos[:, None])  # (Q, T)
        if window is not None:
            visible &= kv > pos[:, None] - window
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        total[b] = scores.softmax(-1).mean(dim=(0, 1))
    return total


class FastV:
    """Runtime policy of ``Plan(fastv_layer=K, fastv_ratio=R, fastv_source=...)``."""

    def __init__(self, layer: int, ratio: float, source: str, facts: Any):
        self.layer = layer
        self.ratio = ratio
        self.source = source
        self.facts = facts
        self._captured: dict[str, torch.Tensor] = {}
        self._scaling: float | None = None

    @contextlib.contextmanager
    def watch(self, i: int, layer: nn.Module) -> Iterator[None]:
        if i != self.layer - 1:
            yield
            return
        attention = getattr(layer, self.facts.parts.attention)
        self._scaling = float(getattr(attention, "scaling", self.facts.head_dim**-0.5))
        # Attentions that normalise q and k per head before RoPE (Qwen3, Qwen3-VL, Gemma 3): read the
        # norms' outputs. Qwen3 normalises (B, T, H, D) before moving the heads forward, Gemma 3 after,
        # as (B, H, T, D) (a transposed, so non-contiguous, input); the projections give (B, T, H * D).
        q_out, k_out = (getattr(attention, f"{x}_norm", None) for x in "qk")
        q_out = attention.q_proj if q_out is None else q_out
        k_out = attention.k_proj if k_out is None else k_out

        def capture(name: str):
            def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                heads_first = output.dim() == 4 and not args[0].is_contiguous()
                self._captured[name] = output.transpose(1, 2) if heads_first else output

            return hook

        handles = [q_out.register_forward_hook(capture("q")), k_out.register_forward_hook(capture("k"))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def keep(self, i: int, run: Any, hidden: torch.Tensor) -> torch.Tensor | None:
        if i != self.layer:
            return None
        q, k = self._captured.pop("q", None), self._captured.pop("k", None)
        if q is None or k is None:
            raise RuntimeError(
                f"FastV needs the attention of layer {i - 1} to run at prefill, and it did not; keep that "
                "layer's attention"
            )
        batch, length = q.shape[:2]
        d = self.facts.head_dim
        q = q.reshape(batch, length, -1, d)  # (B, T', H, D)
        k = k.reshape(batch, length, -1, d)  # (B, T', H_kv, D)
        kind = self.facts.layer_types[i - 1]
        cos, sin = run.frame.rotary(kind)
        text = self.facts.text_config
        window = getattr(text, "sliding_window", None) if kind == "sliding_attention" else None
        real = run.in_layout(run.real)  # (B, T') real tokens of the layout
        if self.source == "last":
            queries = torch.zeros_like(real)
            queries[:, -1] = True
        else:
            queries = real & ~run.visual_in_layout()
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        scores = received_attention(q, k, cos, sin, queries, real, self._scaling, window)  # (B, T')
        scores = run.to_original(scores, 0.0)  # (B, T)
        visual = run.visual & run.keep
        count = visual.sum(1)  # (B,)
        keep_count = torch.floor((1.0 - self.ratio) * count.double() + 0.5).long()
        ranked = scores.masked_fill(~visual, float("-inf")).argsort(dim=1, descending=True, stable=True)
        order = torch.arange(ranked.shape[1], device=ranked.device).expand_as(ranked)
        rank = torch.empty_like(ranked).scatter_(1, ranked, order)  # (B, T): rank of each position
        return ~visual | (rank < keep_count[:, None])


def _source(name: str, value: Any) -> str:
    if value not in SOURCES:
        raise ValueError(f"Plan.{name} is {value!r}; use one of {list(SOURCES)}")
    return value


def _validate(plan: Any) -> None:
    if plan.fastv_layer - 1 in plan.skip_attention:
        raise ValueError(
            f"FastV ranks visual tokens by the attention of layer {plan.fastv_layer - 1}, which the plan "
            "skips; choose a fastv_layer whose previous layer keeps its attention"
        )


def _runner(plan: Any, facts: Any) -> ExitRunner:
    def policy(device: torch.device) -> FastV:
        return FastV(plan.fastv_layer, plan.fastv_ratio, plan.fastv_source, facts)

    return ExitRunner(policy, facts)


def _macs(plan: Any, visual_tokens: int, exit_layer: int | None) -> tuple[int, int]:
    kept = math.floor((1.0 - plan.fastv_ratio) * visual_tokens + 0.5)
    return plan.fastv_layer, visual_tokens - kept


METHOD = register_token_exit(
    TokenExitMethod(
        name="fastv",
        fields=(
            PlanField(
                "fastv_layer",
                None,
                exit_layer_value,
                "FastV: keep the top visual tokens from this layer",
                int,
                layer=True,
            ),
            PlanField(
                "fastv_ratio", 0.5, fraction_value, "FastV: fraction of visual tokens dropped (0.5)", float
            ),
            PlanField(
                "fastv_source", "last", _source, "FastV: whose attention ranks them (last)", str, SOURCES
            ),
        ),
        runner=_runner,
        exit_layer=lambda plan: plan.fastv_layer,
        macs=_macs,
        validate=_validate,
    )
)
