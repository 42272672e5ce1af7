"""How to build an EAS model: :class:`EASConfig` (``shared/METHODS.md`` §2-§3), serialised as JSON beside
the adapter weights. :mod:`skipvlm.eas` builds the model it describes (and re-exports the class)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from skipvlm.adapters import REPLACE_INPUTS
from skipvlm.plan import CANDIDATE_KINDS, Plan

__all__ = ["MLP_REPLACEMENTS", "EASConfig"]

MLP_REPLACEMENTS = ("none", "pia")


@dataclass
class EASConfig:
    """How to build an EAS model. Serialised as JSON beside the adapter weights.

    Args:
        skip_attention: layers whose self-attention is skipped and replaced by a replace-PIA.
        skip_mlp: layers whose MLP is skipped (plainly, or by an FFN-PIA with ``mlp_replace="pia"``).
        skip_layers: layers skipped whole and replaced by a DAS bottleneck adapter (the DAS baseline).
        replace_dim: bottleneck width d_r of the replace-PIA (the spec's default is 4 * adapt_dim), also
            the width of DAS bottleneck adapters.
        adapt_dim: bottleneck width d_a of the adapt-PIA on kept attentions.
        adapt_layers: ``"kept"`` puts an adapt-PIA on every layer whose attention runs; ``"none"`` none.
        supernet: build the adapters of ``candidates`` in every layer, so :meth:`EASModel.set_plan` can
            move the skips anywhere (what the redundancy search trains).
        candidates: what a supernet may skip: ``attention``, ``mlp``, ``attention_or_mlp`` or ``layer``.
        groups: block-diagonal groups G of the up-projections.
        scale: adapter scale s.
        temperature: router temperature tau.
        dropout: dropout on the adapters' bottleneck.
        train_projector: also train the multimodal projector (saved with the adapters).
        init_seed: seed of the adapters' random initialisation.
        single_path: one up-projection and no router in every PIA (``w = (1,)``): the "Base" row of the
            paper's PIA design table. Affine; merges exactly.
        info_exchange: the replace-PIA's pooled path ``g = W_A p + b_A`` (the "Info. Exc." row); False:
            ``g = 0`` and no ``W_A``. Affine; merges exactly.
        freeze_pooled: compute ``p``, ``w``, ``g`` at prefill and freeze them for decoding (the "Frozen
            bias" row; the spec). False: recompute them at every forward over the tokens that forward
            holds (the prompt at prefill and in training, the new tokens at each decoding step), what an
            implementation without frozen state computes. Then the adapters are not one affine map across
            steps, and every merge is refused.
        replace_input: what the replace-PIA reads: ``"normed"``, ``x = N_in(h) = gamma_in * rms(h)`` (the
            spec and the official code; a fresh model feeds ``gamma_post * gamma_in * rms(h)`` to the
            MLP, which is the plain skip only where ``gamma_in = 1``), or ``"rms"``, ``x = rms(h)`` (a
            fresh model computes exactly the plain skip plan). Both merge exactly.
        mlp_replace: what runs in a skipped MLP's place: ``"none"`` (nothing: the plain MLP skip) or
            ``"pia"`` (an FFN-PIA, ``out = a + N_mo(F(N_post(a)))``, the paper's FFN rows; bottleneck
            ``replace_dim``; merged into a rank-``replace_dim`` affine map, 2*C*d_r MACs per token).

    Raises:
        ValueError: a field is out of range; the message names it and the fix.
    """

    skip_attention: list[int] = field(
        default_factory=list, metadata={"help": "layers whose attention is skipped (0-based)"}
    )
    skip_mlp: list[int] = field(default_factory=list, metadata={"help": "layers whose MLP is skipped"})
    skip_layers: list[int] = field(
        default_factory=list, metadata={"help": "layers skipped whole, with a DAS bottleneck adapter"}
    )
    replace_dim: int = field(default=32, metadata={"help": "replace-PIA bottleneck width d_r"})
    adapt_dim: int = field(default=8, metadata={"help": "adapt-PIA bottleneck width d_a"})
    adapt_layers: str = field(
        default="kept", metadata={"help": "'kept': adapt-PIA on kept attentions; 'none'"}
    )
    supernet: bool = field(default=False, metadata={"help": "adapters in every layer, so skips can move"})
    candidates: str = field(default="attention", metadata={"help": "what a supernet may skip"})
    groups: int = field(default=2, metadata={"help": "block-diagonal groups G of the up-projections"})
    scale: float = field(default=1.0, metadata={"help": "adapter output scale s"})
    temperature: float = field(default=10.0, metadata={"help": "router softmax temperature tau"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate on the adapter bottleneck"})
    train_projector: bool = field(default=False, metadata={"help": "also train the multimodal projector"})
    init_seed: int = field(default=0, metadata={"help": "seed of the adapters' initialisation"})
    single_path: bool = field(
        default=False, metadata={"help": "one up-projection, no router (the 'Base' PIA ablation)"}
    )
    info_exchange: bool = field(
        default=True, metadata={"help": "replace-PIA pooled path g = W_A p + b_A (off: g = 0)"}
    )
    freeze_pooled: bool = field(
        default=True,
        metadata={"help": "freeze p, w, g at prefill (off: recomputed every forward; not mergeable)"},
    )
    replace_input: str = field(
        default="normed", metadata={"help": "replace-PIA input: 'normed' (N_in(h)) or 'rms' (rms(h))"}
    )
    mlp_replace: str = field(
        default="none", metadata={"help": "a skipped MLP is replaced by 'none' (plain skip) or 'pia'"}
    )

    def __post_init__(self) -> None:
        plan = Plan(skip_attention=self.skip_attention, skip_mlp=self.skip_mlp)
        self.skip_attention, self.skip_mlp = list(plan.skip_attention), list(plan.skip_mlp)
        self.skip_layers = list(Plan(skip_attention=self.skip_layers).skip_attention)
        clash = sorted(set(self.skip_layers) & (set(self.skip_attention) | set(self.skip_mlp)))
        if clash:
            raise ValueError(
                f"EASConfig.skip_layers {clash} also appear in skip_attention / skip_mlp; a layer skipped "
                "whole is listed in skip_layers only"
            )
        if self.candidates not in CANDIDATE_KINDS:
            raise ValueError(
                f"EASConfig.candidates must be one of {CANDIDATE_KINDS}, got {self.candidates!r}"
            )
        if self.adapt_layers not in ("kept", "none"):
            raise ValueError(f"EASConfig.adapt_layers must be 'kept' or 'none', got {self.adapt_layers!r}")
        for name in ("replace_dim", "adapt_dim", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EASConfig.{name} must be a positive integer, got {value!r}")
        for name in ("replace_dim", "adapt_dim"):
            if getattr(self, name) % self.groups:
                raise ValueError(
                    f"EASConfig.{name}={getattr(self, name)} must be a multiple of groups={self.groups}"
                )
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"EASConfig.{name} must be a finite number, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"EASConfig.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"EASConfig.dropout must be in [0, 1), got {self.dropout}")
        for name in ("single_path", "info_exchange", "freeze_pooled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EASConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.replace_input not in REPLACE_INPUTS:
            raise ValueError(
                f"EASConfig.replace_input must be one of {REPLACE_INPUTS}, got {self.replace_input!r}"
            )
        if self.mlp_replace not in MLP_REPLACEMENTS:
            raise ValueError(
                f"EASConfig.mlp_replace must be one of {MLP_REPLACEMENTS}, got {self.mlp_replace!r}"
            )
        if self.mlp_replace == "pia" and self.supernet and self.candidates == "layer":
            raise ValueError(
                "EASConfig.mlp_replace='pia' replaces skipped MLPs, but a 'layer' supernet skips whole "
                "layers with DAS bottleneck adapters; use candidates='mlp' or 'attention_or_mlp', or "
                "mlp_replace='none'"
            )
        if self.mlp_replace == "pia" and self.supernet and self.candidates == "attention":
            raise ValueError(
                "EASConfig.mlp_replace='pia' replaces skipped MLPs, but an 'attention' supernet never skips "
                "one, so no FFN-PIA would be built; use candidates='mlp' or 'attention_or_mlp', or "
                "mlp_replace='none'"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plan(self) -> Plan:
        """The skip plan this config asks for."""
        return Plan(
            skip_attention=sorted({*self.skip_attention, *self.skip_layers}),
            skip_mlp=sorted({*self.skip_mlp, *self.skip_layers}),
        )

    def adapter_layout(self, num_layers: int) -> tuple[list[int], list[int], list[int]]:
        """(replace-PIA layers, adapt-PIA layers, DAS bottleneck layers) this config builds."""
        everything = list(range(num_layers))
        if self.supernet:
            kind = self.candidates
            replace = everything if kind in ("attention", "attention_or_mlp") else []
            bottleneck = everything if kind == "layer" else []
            adapt = everything
        else:
            replace = [i for i in self.skip_attention if i not in self.skip_mlp]
            bottleneck = list(self.skip_layers)
            plan = self.plan()
            adapt = [i for i in everything if i not in plan.skip_attention]
        return replace, adapt if self.adapt_layers == "kept" else [], bottleneck

    def ffn_layout(self, num_layers: int) -> list[int]:
        """The layers that get an FFN-PIA (``mlp_replace="pia"``): every layer of an ``mlp`` or
        ``attention_or_mlp`` supernet, else the layers of ``skip_mlp``."""
        if self.mlp_replace != "pia":
            return []
        if self.supernet:
            return list(range(num_layers)) if self.candidates in ("mlp", "attention_or_mlp") else []
        return list(self.skip_mlp)

    def mlp_replacement_macs(self, hidden_size: int) -> int:
        """MACs per token of what runs in a skipped MLP's place once merged: ``2 * C * d_r`` for an FFN-PIA
        (its rank-``replace_dim`` affine map), 0 for the plain skip. Pass it to
        :func:`skipvlm.cost.count_macs` as ``mlp_replacement``."""
        return 2 * hidden_size * self.replace_dim if self.mlp_replace == "pia" else 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EASConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error (a newer or foreign file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EASConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)
