"""The plan: which decoder modules a model runs and which visual tokens it keeps, as a serialisable value.

A :class:`Plan` names, per decoder layer, whether its self-attention and / or its MLP is skipped
(``shared/METHODS.md`` §1), and at most one visual-token exit method (§4): VTW, FastV or DyVTE. It is
pure data: :mod:`skipvlm.runtime` executes it on a model. Plans travel beside adapters, checkpoints
and results as JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from skipvlm.io import atomic_write_text

__all__ = ["Plan"]

_FORMAT_VERSION = 1
_LAYER_LISTS = ("skip_attention", "skip_mlp")
# What a search can skip (skipvlm.search.Candidates): attentions (EAS), MLPs, either, or whole layers (DAS).
CANDIDATE_KINDS = ("attention", "mlp", "attention_or_mlp", "layer")
FASTV_SOURCES = ("last", "text")
# The visual-token exit fields, as named in Plan (and as CLI options).
TOKEN_FIELDS = ("visual_exit_layer", "fastv_layer", "fastv_ratio", "fastv_source", "dyvte", "dyvte_threshold")
# Attribute of a model's config holding the plan it runs (Plan.to_dict()), so save_pretrained carries it
# and skipvlm.load_pretrained re-applies it.
CONFIG_KEY = "skipvlm_plan"


def _layer_list(name: str, values: Any) -> tuple[int, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"Plan.{name} must be a list of layer indices, got {values!r}")
    out = []
    for v in values:
        # bool is an int subclass; `True` as a layer index is always a mistake.
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise ValueError(f"Plan.{name} holds {v!r}, which is not an integer layer index")
        v = v.__index__()
        if v < 0:
            raise ValueError(
                f"Plan.{name} holds the negative index {v}; layer indices count from 0 "
                "(write L-1 for the last layer rather than -1)"
            )
        out.append(v)
    dupes = sorted({v for v in out if out.count(v) > 1})
    if dupes:
        raise ValueError(f"Plan.{name} lists layer(s) {dupes} more than once; list each layer once")
    return tuple(sorted(out))


def _optional_layer(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"Plan.{name} must be a layer index (an integer) or None, got {value!r}")
    value = value.__index__()
    if value < 1:
        raise ValueError(
            f"Plan.{name} is {value}; visual tokens can leave from layer 1 on (layer 0 must see the image "
            "at least once), so use 1 or more"
        )
    return value


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Plan.{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Plan.{name} is {value}; it must lie in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class Plan:
    """Which attention and MLP modules of the decoder are skipped, and when visual tokens leave.

    Layer indices are stored sorted, as tuples. An empty plan is the stock model. Visual tokens (the
    positions holding the image / video token id) are withdrawn by at most one of three methods
    (``shared/METHODS.md`` §4); from the exit layer on, the layers run on the remaining tokens only
    and their KV cache holds those only.

    Args:
        skip_attention: layers whose self-attention runs nothing (no q/k/v/o, no kernel, no KV cache).
        skip_mlp: layers whose MLP runs nothing.
        visual_exit_layer: VTW: every visual token is withdrawn before this layer (1..L; L changes
            nothing). Calibrate it with :func:`skipvlm.calibrate_vtw`.
        fastv_layer: FastV: from this layer on only the top ``1 - fastv_ratio`` visual tokens are kept,
            ranked by the attention they receive at layer ``fastv_layer - 1``.
        fastv_ratio: FastV: the fraction R of each example's visual tokens that is dropped.
        fastv_source: FastV: whose attention ranks the visual tokens: ``"last"`` (the last prompt token,
            the paper's choice) or ``"text"`` (every text token, averaged).
        dyvte: DyVTE: a folder of routers saved by :func:`skipvlm.train_dyvte`; each example withdraws
            its visual tokens at the first layer whose router says exit.
        dyvte_threshold: DyVTE: the exit probability a router must exceed.
        candidates: what the plan was searched over (``attention``, ``mlp``, ``attention_or_mlp`` or
            ``layer``), recorded by :func:`skipvlm.search` so that training a saved plan gives the
            right adapters (``layer``: DAS bottlenecks for whole skipped layers; otherwise PIA). None
            for a hand-written plan. It does not change what runs, and plans compare equal without it.

    Raises:
        ValueError: an index is negative, not an integer or listed twice; more than one token-exit
            method is set; FastV ranks by an attention the plan skips; or no attention runs before the
            exit layer (the KV cache would then have no layer that holds the full sequence).
    """

    skip_attention: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()
    visual_exit_layer: int | None = None
    fastv_layer: int | None = None
    fastv_ratio: float = 0.5
    fastv_source: str = "last"
    dyvte: str | None = None
    dyvte_threshold: float = 0.5
    candidates: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.candidates is not None and self.candidates not in CANDIDATE_KINDS:
            raise ValueError(
                f"Plan.candidates is {self.candidates!r}; use one of {list(CANDIDATE_KINDS)} or None"
            )
        for name in _LAYER_LISTS:
            object.__setattr__(self, name, _layer_list(name, getattr(self, name)))
        for name in ("visual_exit_layer", "fastv_layer"):
            object.__setattr__(self, name, _optional_layer(name, getattr(self, name)))
        object.__setattr__(self, "fastv_ratio", _fraction("fastv_ratio", self.fastv_ratio))
        object.__setattr__(self, "dyvte_threshold", _fraction("dyvte_threshold", self.dyvte_threshold))
        if self.fastv_source not in FASTV_SOURCES:
            raise ValueError(f"Plan.fastv_source is {self.fastv_source!r}; use one of {list(FASTV_SOURCES)}")
        if self.dyvte is not None:
            if not isinstance(self.dyvte, (str, os.PathLike)) or not str(self.dyvte):
                raise ValueError(
                    f"Plan.dyvte must be the path of a router folder saved by skipvlm.train_dyvte, got "
                    f"{self.dyvte!r}"
                )
            object.__setattr__(self, "dyvte", str(self.dyvte))
        methods = [name for name in ("visual_exit_layer", "fastv_layer", "dyvte") if getattr(self, name)]
        if len(methods) > 1:
            raise ValueError(
                f"the plan sets {methods}; use one visual-token exit method at a time (VTW, FastV or DyVTE)"
            )
        if self.fastv_layer is not None and self.fastv_layer - 1 in self.skip_attention:
            raise ValueError(
                f"FastV ranks visual tokens by the attention of layer {self.fastv_layer - 1}, which the plan "
                "skips; choose a fastv_layer whose previous layer keeps its attention"
            )
        exit_layer = self.visual_exit_layer or self.fastv_layer
        if exit_layer is not None and all(i in self.skip_attention for i in range(exit_layer)):
            raise ValueError(
                f"visual tokens leave at layer {exit_layer}, but every attention before it is skipped, so no "
                "cache layer would hold the whole sequence; keep an attention below the exit layer"
            )

    def __repr__(self) -> str:
        # Only what differs from the stock model (FastV's ratio and source only with FastV on).
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default or (
                f.name.startswith("fastv_") and f.name != "fastv_layer" and not self.fastv_layer
            ):
                continue
            if (f.name == "dyvte_threshold" and not self.dyvte) or f.name == "candidates":
                continue
            shown.append(f"{f.name}={value!r}")
        return f"Plan({', '.join(shown)})"

    @property
    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return not (self.skip_attention or self.skip_mlp or self.exits_tokens)

    @property
    def exits_tokens(self) -> bool:
        """True when the plan withdraws visual tokens (VTW, FastV or DyVTE)."""
        return bool(self.visual_exit_layer or self.fastv_layer or self.dyvte)

    def skips_only(self) -> Plan:
        """This plan without its visual-token exit."""
        return Plan(skip_attention=self.skip_attention, skip_mlp=self.skip_mlp)

    def with_skips(self, skip_attention: Any = None, skip_mlp: Any = None) -> Plan:
        """This plan with other skipped modules (``None`` keeps the current list); token exit is kept."""
        return replace(
            self,
            skip_attention=self.skip_attention if skip_attention is None else skip_attention,
            skip_mlp=self.skip_mlp if skip_mlp is None else skip_mlp,
        )

    def validate_for(self, num_layers: int) -> None:
        """Check the plan against a model with ``num_layers`` decoder layers.

        Raises:
            ValueError: an index is out of range; the message gives the allowed range.
        """
        for name in _LAYER_LISTS:
            bad = [i for i in getattr(self, name) if i >= num_layers]
            if bad:
                raise ValueError(
                    f"Plan.{name} names layer(s) {bad}, but the model has {num_layers} decoder layers; "
                    f"allowed indices are 0..{num_layers - 1}"
                )
        for name in ("visual_exit_layer", "fastv_layer"):
            value = getattr(self, name)
            if value is not None and value > num_layers:
                raise ValueError(
                    f"Plan.{name} is {value}, but the model has {num_layers} decoder layers; use "
                    f"1..{num_layers} ({num_layers} keeps every visual token)"
                )

    def runs_attention(self, layer: int) -> bool:
        return layer not in self.skip_attention

    def runs_mlp(self, layer: int) -> bool:
        return layer not in self.skip_mlp

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (layer lists as lists, plus a format version)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _LAYER_LISTS:
            d[name] = list(d[name])
        d["format_version"] = _FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Build a plan from :meth:`to_dict` output.

        Raises:
            ValueError: unknown keys (the message lists the known ones) or a newer format version.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"plan format version {version} is not readable by this skipvlm "
                f"(reads version {_FORMAT_VERSION}); upgrade skipvlm"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown plan field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"a plan must be JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically (a crash never leaves a half-written file)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a valid plan (the message names the file).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no plan file at {path}")
        try:
            return cls.from_json(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
