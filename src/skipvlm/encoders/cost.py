"""Analytic MACs of a BridgeTower / METER forward, per module, and what a plan removes (``shared/METHODS.md``
§5, §7).

From the config alone (the ``meta`` device costs nothing). With T text tokens, N = (S / P)^2 + 1 image
tokens, co-attention width C, FFN width F (text encoder C_t, F_t; ViT E, 4E):

* text encoder: per layer ``T (4 C_t^2 + 2 C_t F_t) + 2 T^2 C_t``; ViT: patch embedding ``(N - 1) 3 P^2 E``,
  per layer ``N (4 E^2 + 8 E^2) + 2 N^2 E`` (every layer runs: the co-attention layers read the top ones);
* bridges: the per-layer input projections ``T C_t C + N E C`` for each of the L co-attention layers
  (the link towers' LayerNorms cost no MACs);
* co-attention layer, stream s with T_s own and T_o other tokens: self-attention ``4 C^2 T_s`` projections
  plus ``2 T_s^2 C`` scores / values; cross-attention ``2 C^2 T_s`` (q, o) + ``2 C^2 T_o`` (k, v on the
  other stream) plus ``2 T_s T_o C``; FFN ``2 C F T_s``;
* poolers ``2 C^2``; the VQA head ``4 C^2 + 2 C A``.

A plan removes the sublayers it skips (a skipped sublayer runs no projection and no kernel); the
``paper`` convention leaves out the ``T^2`` / ``T_s T_o`` terms, as fvcore-style counts do.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

from skipvlm.encoders.names import STREAMS, attention_names, layer_names
from skipvlm.plan import Plan

__all__ = ["EncoderCost", "count_encoder_macs", "das_share", "plan_shares", "sublayer_macs"]


def _config(model_or_config: Any) -> PretrainedConfig:
    from skipvlm.arch import unwrap

    return getattr(unwrap(model_or_config), "config", model_or_config)


def image_tokens(config: PretrainedConfig) -> int:
    """N: the ViT's patches plus its class token."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def sublayer_macs(config: PretrainedConfig, text_tokens: int, paper: bool = False) -> dict[str, int]:
    """MACs of every co-attention sublayer by name (``"text.0.self"`` ... ``"image.5.ffn"``)."""
    c, f = config.hidden_size, config.text_config.intermediate_size
    tokens = {"text": text_tokens, "image": image_tokens(config)}
    out = {}
    for i in range(config.num_hidden_layers):
        for s, o in zip(STREAMS, reversed(STREAMS), strict=True):
            ts, to = tokens[s], tokens[o]
            sdp = 0 if paper else 1
            out[f"{s}.{i}.self"] = 4 * c * c * ts + sdp * 2 * ts * ts * c
            out[f"{s}.{i}.cross"] = 2 * c * c * ts + 2 * c * c * to + sdp * 2 * ts * to * c
            out[f"{s}.{i}.ffn"] = 2 * c * f * ts
    return out


@dataclass
class EncoderCost:
    """MACs per module of one forward (one image, ``text_tokens`` text tokens) under ``plan``."""

    text_tokens: int
    image_tokens: int
    modules: dict[str, int]
    sublayers: dict[str, int]
    plan: Plan = field(default_factory=Plan)

    @property
    def co_attention(self) -> int:
        return sum(self.sublayers.values())

    @property
    def total(self) -> int:
        return sum(self.modules.values()) + self.co_attention

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_tokens": self.text_tokens,
            "image_tokens": self.image_tokens,
            "plan": self.plan.to_dict(),
            "total": self.total,
            "co_attention": self.co_attention,
            "modules": self.modules,
            "sublayers": self.sublayers,
        }


def count_encoder_macs(
    model_or_config: Any,
    text_tokens: int,
    plan: Plan | None = None,
    paper: bool = False,
    extra: int = 0,
) -> EncoderCost:
    """MACs of one BridgeTower forward over ``text_tokens`` text tokens and one image.

    Args:
        model_or_config: a BridgeTower model (or head model) or its config.
        text_tokens: T.
        plan: skipped sublayers (default: none).
        paper: leave out the ``T^2`` / ``T_s T_o`` score and value terms.
        extra: MACs of modules outside the stock model (e.g. adapters), counted as ``adapters``.

    Raises:
        ValueError: ``text_tokens`` is not a positive integer, or ``plan`` does not fit the model.
    """
    from skipvlm.encoders.host import HOST

    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise ValueError(f"text_tokens must be a positive integer, got {text_tokens!r}")
    config = _config(model_or_config)
    plan = plan or Plan()
    HOST.validate(plan, int(config.num_hidden_layers))
    text, vision = config.text_config, config.vision_config
    t, n, c = text_tokens, image_tokens(config), config.hidden_size
    e, ct, ft = vision.hidden_size, text.hidden_size, text.intermediate_size
    sdp = 0 if paper else 1
    per_text = t * (4 * ct * ct + 2 * ct * ft) + sdp * 2 * t * t * ct
    per_vit = n * (4 * e * e + 8 * e * e) + sdp * 2 * n * n * e
    patch = vision.patch_size
    modules = {
        "text_encoder": text.num_hidden_layers * per_text,
        "vision_encoder": (n - 1) * 3 * patch * patch * e + vision.num_hidden_layers * per_vit,
        "bridges": config.num_hidden_layers * (t * ct * c + n * e * c),
        "poolers": 2 * c * c,
    }
    labels = getattr(config, "num_labels", 0) if getattr(config, "id2label", None) else 0
    if labels > 2:
        modules["vqa_head"] = 4 * c * c + 2 * c * labels
    if extra:
        modules["adapters"] = extra
    skipped = {*plan.skip_attention, *plan.skip_mlp}
    sublayers = {k: (0 if k in skipped else v) for k, v in sublayer_macs(config, t, paper).items()}
    return EncoderCost(t, n, modules, sublayers, plan)


def plan_shares(config: PretrainedConfig, text_tokens: int, k: int, paper: bool = False) -> dict[str, float]:
    """Share of the total removed by skipping ``k`` attention sublayers: the cheapest k, the mean over
    every choice of k (``k`` times the mean sublayer), and the most expensive k."""
    base = count_encoder_macs(config, text_tokens, paper=paper).total
    macs = sublayer_macs(config, text_tokens, paper)
    costs = sorted(macs[n] for n in attention_names(config.num_hidden_layers))
    return {
        "min": sum(costs[:k]) / base,
        "mean": k * statistics.fmean(costs) / base,
        "max": sum(costs[-k:]) / base,
    }


def das_share(config: PretrainedConfig, text_tokens: int, layers: int, paper: bool = False) -> float:
    """Share of the total removed by skipping ``layers`` whole co-attention layers (all layers cost alike)."""
    base = count_encoder_macs(config, text_tokens, paper=paper).total
    macs = sublayer_macs(config, text_tokens, paper)
    one = sum(macs[n] for names in layer_names(0) for n in names)
    return layers * one / base
