"""The skip plan: which decoder modules a model runs, as a small serialisable value.

A :class:`Plan` names, per decoder layer, whether its self-attention and / or its MLP is skipped
(``shared/METHODS.md`` §1). It is pure data: :mod:`skipvlm.runtime` executes it on a model. Plans
travel beside adapters, checkpoints and results as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from skipvlm.io import atomic_write_text

__all__ = ["Plan"]

_FORMAT_VERSION = 1


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


@dataclass(frozen=True)
class Plan:
    """Which attention and MLP modules of the decoder are skipped.

    Layer indices are stored sorted, as tuples. An empty plan is the stock model.

    Args:
        skip_attention: layers whose self-attention runs nothing (no q/k/v/o, no kernel, no KV cache).
        skip_mlp: layers whose MLP runs nothing.

    Raises:
        ValueError: an index is negative, not an integer, or listed twice.
    """

    skip_attention: tuple[int, ...] = ()
    skip_mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _layer_list(f.name, getattr(self, f.name)))

    @property
    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return not (self.skip_attention or self.skip_mlp)

    def validate_for(self, num_layers: int) -> None:
        """Check the plan against a model with ``num_layers`` decoder layers.

        Raises:
            ValueError: an index is out of range; the message gives the allowed range.
        """
        for f in fields(self):
            bad = [i for i in getattr(self, f.name) if i >= num_layers]
            if bad:
                raise ValueError(
                    f"Plan.{f.name} names layer(s) {bad}, but the model has {num_layers} decoder layers; "
                    f"allowed indices are 0..{num_layers - 1}"
                )

    def runs_attention(self, layer: int) -> bool:
        return layer not in self.skip_attention

    def runs_mlp(self, layer: int) -> bool:
        return layer not in self.skip_mlp

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists of ints, plus a format version)."""
        d: dict[str, Any] = {f.name: list(getattr(self, f.name)) for f in fields(self)}
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
