"""Sublayer names of a two-stream encoder host and its candidate spaces (``shared/METHODS.md`` §3, §7).

A co-attention layer ``i`` holds, per stream ``s`` in {``text``, ``image``}, a self-attention, a
cross-attention (queries from ``s``, keys / values from the other stream) and an FFN. Plans name them
``"<stream>.<layer>.<sublayer>"`` with sublayer ``self`` or ``cross`` (in ``Plan.skip_attention``) or
``ffn`` (in ``Plan.skip_mlp``). :class:`EncoderCandidates` maps the bandit's arms to plans, with the
interface of :class:`skipvlm.search.Candidates`:

* ``attention`` (EAS): ``4 L`` arms, every attention sublayer of both streams;
* ``mlp``: ``2 L`` arms, every FFN;
* ``attention_or_mlp``: the ``4 L`` attentions, then the ``2 L`` FFNs;
* ``layer`` (DAS): ``L`` arms, the whole co-attention layer ``i`` (both streams, all six sublayers).
"""

from __future__ import annotations

from dataclasses import dataclass

from skipvlm.plan import CANDIDATE_KINDS, Plan, name_key

__all__ = [
    "ATTENTION_KINDS",
    "STREAMS",
    "EncoderCandidates",
    "attention_names",
    "check_names",
    "layer_names",
    "sublayer_name",
    "whole_layers",
]

STREAMS = ("text", "image")
ATTENTION_KINDS = ("self", "cross")
FFN = "ffn"


def sublayer_name(stream: str, layer: int, kind: str) -> str:
    """``"<stream>.<layer>.<kind>"``."""
    return f"{stream}.{layer}.{kind}"


def attention_names(num_layers: int) -> list[str]:
    """Every attention sublayer of a host with ``num_layers`` co-attention layers, in arm order: layer by
    layer, text before image, self before cross."""
    return [sublayer_name(s, i, k) for i in range(num_layers) for s in STREAMS for k in ATTENTION_KINDS]


def ffn_names(num_layers: int) -> list[str]:
    """Every FFN, in arm order: layer by layer, text before image."""
    return [sublayer_name(s, i, FFN) for i in range(num_layers) for s in STREAMS]


def layer_names(layer: int) -> tuple[list[str], list[str]]:
    """(attention names, FFN names) of the whole co-attention layer ``layer`` (both streams)."""
    attention = [sublayer_name(s, layer, k) for s in STREAMS for k in ATTENTION_KINDS]
    return attention, [sublayer_name(s, layer, FFN) for s in STREAMS]


def whole_layers(plan: Plan, num_layers: int) -> list[int]:
    """The co-attention layers a plan skips whole (all six sublayers)."""
    skipped = {*plan.skip_attention, *plan.skip_mlp}
    out = []
    for i in range(num_layers):
        attention, ffn = layer_names(i)
        if skipped.issuperset(attention + ffn):
            out.append(i)
    return out


def check_names(plan: Plan, num_layers: int) -> None:
    """Check that a plan's skip lists name sublayers this host has.

    Raises:
        ValueError: a list holds layer indices (the decoder hosts' form), an unknown stream or sublayer,
            an attention in ``skip_mlp`` (or an FFN in ``skip_attention``), or a layer out of range.
    """
    for field, allowed in (("skip_attention", ATTENTION_KINDS), ("skip_mlp", (FFN,))):
        values = getattr(plan, field)
        indices = [v for v in values if not isinstance(v, str)]
        if indices:
            example = "'text.1.cross', 'image.0.self'" if field == "skip_attention" else "'text.1.ffn'"
            raise ValueError(
                f"Plan.{field} holds layer indices {indices}, but this two-stream encoder host names its "
                f"sublayers '<stream>.<layer>.<sublayer>' (e.g. {example}); integer indices are the decoder "
                "hosts' form"
            )
        for value in values:
            stream, layer, kind = name_key(value)
            if stream not in STREAMS:
                raise ValueError(
                    f"Plan.{field}: {value!r} names stream {stream!r}; streams are {list(STREAMS)}"
                )
            if kind not in allowed:
                raise ValueError(
                    f"Plan.{field}: {value!r} names sublayer {kind!r}; {field} takes {list(allowed)}"
                    + (" (FFNs go in skip_mlp as '<stream>.<layer>.ffn')" if kind == FFN else "")
                    + (" (attentions go in skip_attention)" if kind in ATTENTION_KINDS else "")
                )
            if layer >= num_layers:
                raise ValueError(
                    f"Plan.{field}: {value!r} names co-attention layer {layer}, but the model has "
                    f"{num_layers}; layers are 0..{num_layers - 1}"
                )


@dataclass(frozen=True)
class EncoderCandidates:
    """The arms of one candidate kind on an encoder host with ``num_layers`` co-attention layers, and the
    plan of a subset (the interface of :class:`skipvlm.search.Candidates`)."""

    kind: str
    num_layers: int

    def __post_init__(self) -> None:
        if self.kind not in CANDIDATE_KINDS:
            raise ValueError(f"unknown candidate kind {self.kind!r}; choose one of {CANDIDATE_KINDS}")

    def _names(self) -> list[str]:
        if self.kind == "attention":
            return attention_names(self.num_layers)
        if self.kind == "mlp":
            return ffn_names(self.num_layers)
        return attention_names(self.num_layers) + ffn_names(self.num_layers)

    @property
    def num_arms(self) -> int:
        return self.num_layers if self.kind == "layer" else len(self._names())

    def plan(self, arms: list[int]) -> Plan:
        """The skip plan that skips ``arms``."""
        if self.kind == "layer":
            attention = [n for i in sorted(arms) for n in layer_names(i)[0]]
            ffn = [n for i in sorted(arms) for n in layer_names(i)[1]]
            return Plan(skip_attention=attention, skip_mlp=ffn)
        names = [self._names()[a] for a in arms]
        return Plan(
            skip_attention=[n for n in names if not n.endswith(f".{FFN}")],
            skip_mlp=[n for n in names if n.endswith(f".{FFN}")],
        )

    def arms(self, plan: Plan) -> list[int]:
        """The arms a plan of this kind skips (the inverse of :meth:`plan`)."""
        if self.kind == "layer":
            return whole_layers(plan, self.num_layers)
        names = self._names()
        return sorted(names.index(n) for n in (*plan.skip_attention, *plan.skip_mlp) if n in names)

    def describe(self, arm: int) -> str:
        """A readable arm name, e.g. ``text.1.cross`` or ``layer 2``."""
        return f"layer {arm}" if self.kind == "layer" else self._names()[arm]
