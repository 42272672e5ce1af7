"""The plan: which decoder modules a model runs and which visual tokens it keeps, as a serialisable value.

A :class:`Plan` names, per decoder layer, whether its self-attention and / or its MLP is skipped
(``shared/METHODS.md`` §1), and at most one visual-token exit method (§4). On a two-stream encoder host
(§7, :mod:`skipvlm.encoders`) the skip lists hold sublayer *names* instead of layer indices,
``"<stream>.<layer>.<sublayer>"`` (e.g. ``"text.1.cross"``); the host checks the streams and sublayers,
and a decoder host refuses names (an encoder host refuses indices). It is pure data:
:mod:`skipvlm.runtime` executes it on a model. Plans travel beside adapters, checkpoints and results
as JSON.

Token-exit methods are not written here: each declares, in its own file, its plan fields, how it runs
and what it costs (a :class:`TokenExitMethod`, registered with :func:`register_token_exit`); the
built-in ones (VTW, FastV, DyVTE) are in :mod:`skipvlm.tokens`. Their fields read as attributes of the
plan (``plan.visual_exit_layer``) and serialise flat beside the skip lists.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skipvlm.io import atomic_write_text

__all__ = [
    "Plan",
    "PlanField",
    "TokenExitMethod",
    "register_token_exit",
    "token_exit_fields",
    "token_exit_methods",
]

_FORMAT_VERSION = 1
_LAYER_LISTS = ("skip_attention", "skip_mlp")
# What a search can skip (skipvlm.search.Candidates): attentions (EAS), MLPs, either, or whole layers (DAS).
CANDIDATE_KINDS = ("attention", "mlp", "attention_or_mlp", "layer")
# Attribute of a model's config holding the plan it runs (Plan.to_dict()), so save_pretrained carries it
# and skipvlm.load_pretrained re-applies it.
CONFIG_KEY = "skipvlm_plan"


# A sublayer of an encoder host: "<stream>.<layer>.<sublayer>", e.g. "text.1.cross" (METHODS §7).
_NAME = re.compile(r"^([a-z_]+)\.(0|[1-9][0-9]*)\.([a-z_]+)$")


def name_key(name: str) -> tuple[str, int, str]:
    """(stream, layer, sublayer) of a sublayer name, the order plans keep names in.

    Raises:
        ValueError: ``name`` is not ``"<stream>.<layer>.<sublayer>"``.
    """
    match = _NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"{name!r} is not a sublayer name; write '<stream>.<layer>.<sublayer>', e.g. 'text.1.cross'"
        )
    return match[1], int(match[2]), match[3]


def uses_names(plan: Plan) -> bool:
    """True when the plan's skip lists name encoder sublayers (strings) rather than decoder layers."""
    return any(isinstance(v, str) for v in (*plan.skip_attention, *plan.skip_mlp))


def _name_list(name: str, values: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise ValueError(
            f"Plan.{name} mixes sublayer names and layer indices ({values!r}); a plan uses one form: "
            "integer layer indices on a decoder host, '<stream>.<layer>.<sublayer>' names on an encoder host"
        )
    for v in values:
        name_key(v)
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"Plan.{name} lists {dupes} more than once; list each sublayer once")
    return tuple(sorted(values, key=name_key))


def _layer_list(name: str, values: Any) -> tuple[int, ...] | tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"Plan.{name} must be a list of layer indices, got {values!r}")
    values = list(values)
    if any(isinstance(v, str) for v in values):
        return _name_list(name, values)
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


def exit_layer_value(name: str, value: Any) -> int | None:
    """A plan field that names the layer visual tokens leave before (None: off); 1 or more."""
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


def fraction_value(name: str, value: Any) -> float:
    """A plan field in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Plan.{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Plan.{name} is {value}; it must lie in [0, 1]")
    return float(value)


@dataclass(frozen=True)
class PlanField:
    """One field a token-exit method adds to :class:`Plan` (also a CLI option, ``--name-with-dashes``).

    Args:
        name: the attribute and JSON key.
        default: its value when not given (the method is off while its switch field is at default).
        check: ``check(name, value)`` returns the value to store or raises ValueError naming the fix.
        help: one line for the CLI and the docs.
        type: how the CLI parses it.
        choices: the allowed values, if a closed set.
        layer: True for a layer index (checked against the model's layer count, 1..L).
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[Any, ...] | None = None
    layer: bool = False


@dataclass(frozen=True)
class TokenExitMethod:
    """A visual-token exit method, declared in its own file and registered once.

    Args:
        name: short name (``"vtw"``).
        fields: its plan fields; the first is the switch (set: the method is on).
        runner: ``runner(plan, facts)`` compiles the plan for a model (loading what it needs and
            refusing what cannot run); the result's ``begin(step, input_ids, attention_mask)`` gives
            each forward's hook (see :class:`skipvlm.runtime.ExitHook`).
        exit_layer: ``exit_layer(plan)``: the first layer without visual tokens when the plan fixes it
            (``None`` for a per-example exit such as DyVTE's).
        macs: ``macs(plan, visual_tokens, exit_layer)`` -> ``(first layer, visual tokens dropped
            from it on)`` for :mod:`skipvlm.cost` (``exit_layer``: a measured one, or None).
        validate: ``validate(plan)`` raises ValueError for a plan the method cannot run whatever the
            model (e.g. FastV ranking by a skipped attention).
        per_example: the exit layer depends on each example (so MACs need a measured one).
    """

    name: str
    fields: tuple[PlanField, ...]
    runner: Callable[[Any, Any], Any]
    exit_layer: Callable[[Any], int | None]
    macs: Callable[[Any, int, int | None], tuple[int, int]]
    validate: Callable[[Any], None] = lambda plan: None
    per_example: bool = False

    @property
    def switch(self) -> str:
        return self.fields[0].name


_METHODS: dict[str, TokenExitMethod] = {}


def register_token_exit(method: TokenExitMethod) -> TokenExitMethod:
    """Add a token-exit method; its fields become :class:`Plan` fields. Registering a method of a name
    already registered replaces it. Returns ``method``.

    Raises:
        ValueError: a field of the method is another method's (or a skip list's) already.
    """
    taken = {f.name for m in _METHODS.values() if m.name != method.name for f in m.fields}
    clash = sorted(taken & {f.name for f in method.fields} | (set(_CORE) & {f.name for f in method.fields}))
    if clash:
        raise ValueError(f"token-exit method {method.name!r}: plan field(s) {clash} are taken")
    _METHODS[method.name] = method
    return method


def token_exit_methods() -> tuple[TokenExitMethod, ...]:
    """The registered token-exit methods (the built-in ones are loaded on first use)."""
    import skipvlm.tokens  # noqa: F401  (registers VTW, FastV and DyVTE)

    return tuple(_METHODS.values())


def token_exit_fields() -> tuple[PlanField, ...]:
    """Every registered token-exit method's plan fields (what the CLI offers as options)."""
    return tuple(f for m in token_exit_methods() for f in m.fields)


def _token_fields() -> dict[str, tuple[TokenExitMethod, PlanField]]:
    return {f.name: (m, f) for m in token_exit_methods() for f in m.fields}


_CORE = ("skip_attention", "skip_mlp", "candidates")


class Plan:
    """Which attention and MLP modules of the decoder are skipped, and when visual tokens leave.

    Layer indices are stored sorted, as tuples. An empty plan is the stock model. Plans are immutable
    values: compare, hash and :meth:`replace` them. Visual tokens (the positions holding the image /
    video token id) are withdrawn by at most one token-exit method (``shared/METHODS.md`` §4); from
    the exit layer on, the layers run on the remaining tokens only and their KV cache holds those only.

    Args:
        skip_attention: layers whose self-attention runs nothing (no q/k/v/o, no kernel, no KV cache);
            on an encoder host, attention sublayers by name (``["text.1.cross", "image.0.self"]``).
        skip_mlp: layers whose MLP runs nothing (encoder host: ``"<stream>.<layer>.ffn"`` names).
        candidates: what the plan was searched over (``attention``, ``mlp``, ``attention_or_mlp`` or
            ``layer``), recorded by :func:`skipvlm.search` so that training a saved plan gives the
            right adapters (``layer``: DAS bottlenecks for whole skipped layers; otherwise PIA). None
            for a hand-written plan. It does not change what runs, and plans compare equal without it.
        **token_exit: the fields of a registered token-exit method (:func:`token_exit_methods`):

            * VTW: ``visual_exit_layer`` (every visual token is withdrawn before this layer, 1..L;
              calibrate it with :func:`skipvlm.calibrate_vtw`);
            * FastV: ``fastv_layer`` (from this layer on only the top ``1 - fastv_ratio`` visual
              tokens stay, ranked by the attention they receive at layer ``fastv_layer - 1``),
              ``fastv_ratio`` (0.5), ``fastv_source`` (``"last"``: the last prompt token; ``"text"``:
              every text token);
            * DyVTE: ``dyvte`` (a router folder saved by :func:`skipvlm.train_dyvte`),
              ``dyvte_threshold`` (0.5).

    Raises:
        ValueError: an index is negative, not an integer or listed twice; a field is unknown or out of
            range; more than one token-exit method is set; or no attention runs before the exit layer
            (the KV cache would then have no layer that holds the full sequence).
    """

    __slots__ = ("_exit", "candidates", "skip_attention", "skip_mlp")

    def __init__(
        self,
        skip_attention: Any = (),
        skip_mlp: Any = (),
        *,
        candidates: str | None = None,
        **token_exit: Any,
    ):
        if candidates is not None and candidates not in CANDIDATE_KINDS:
            raise ValueError(f"Plan.candidates is {candidates!r}; use one of {list(CANDIDATE_KINDS)} or None")
        known = _token_fields()
        unknown = sorted(set(token_exit) - set(known))
        if unknown:
            raise ValueError(f"unknown plan field(s) {unknown}; known fields are {sorted([*_CORE, *known])}")
        values = {}
        for name, (_, spec) in known.items():
            value = token_exit.get(name, spec.default)
            values[name] = spec.default if value is None and spec.default is None else spec.check(name, value)
        setter = object.__setattr__
        setter(self, "skip_attention", _layer_list("skip_attention", skip_attention))
        setter(self, "skip_mlp", _layer_list("skip_mlp", skip_mlp))
        setter(self, "candidates", candidates)
        setter(self, "_exit", values)
        on = [m for m in token_exit_methods() if values[m.switch] not in (None, m.fields[0].default)]
        if len(on) > 1:
            raise ValueError(
                f"the plan sets {[m.switch for m in on]}; use one visual-token exit method at a time "
                f"({', '.join(m.name for m in token_exit_methods())})"
            )
        method = on[0] if on else None
        setter(self, "_exit", {"method": method, **values})
        if method is not None:
            method.validate(self)
            exit_layer = method.exit_layer(self)
            if exit_layer is not None and all(i in self.skip_attention for i in range(exit_layer)):
                raise ValueError(
                    f"visual tokens leave at layer {exit_layer}, but every attention before it is skipped, "
                    "so no cache layer would hold the whole sequence; keep an attention below the exit layer"
                )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        fields = self.token_fields()  # a method registered after this plan was built reads as its default
        if name in fields:
            return fields[name]
        raise AttributeError(f"Plan has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Plan is immutable; build another with plan.replace(...)")

    def _key(self) -> tuple:
        defaults = {name: spec.default for name, (_, spec) in _token_fields().items()}
        changed = sorted((k, v) for k, v in self.token_fields().items() if v != defaults[k])
        return (self.skip_attention, self.skip_mlp, tuple(changed))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple:
        return (_from_fields, (self.to_dict(),))

    def __repr__(self) -> str:
        # Only what differs from the stock model, and only the active method's fields.
        shown = [f"{n}={v!r}" for n in ("skip_attention", "skip_mlp") if (v := getattr(self, n))]
        method = self.token_exit
        if method is not None:
            shown += [f"{f.name}={self._exit[f.name]!r}" for f in method.fields if f is method.fields[0]]
            shown += [
                f"{f.name}={self._exit[f.name]!r}"
                for f in method.fields[1:]
                if self._exit[f.name] != f.default
            ]
        return f"Plan({', '.join(shown)})"

    def token_fields(self) -> dict[str, Any]:
        """The token-exit fields, every registered method's, by name."""
        exit_fields = object.__getattribute__(self, "_exit")
        return {name: exit_fields.get(name, spec.default) for name, (_, spec) in _token_fields().items()}

    @property
    def token_exit(self) -> TokenExitMethod | None:
        """The plan's token-exit method, or None."""
        return self._exit["method"]

    @property
    def is_empty(self) -> bool:
        """True when the plan changes nothing."""
        return not (self.skip_attention or self.skip_mlp or self.exits_tokens)

    @property
    def exits_tokens(self) -> bool:
        """True when the plan withdraws visual tokens."""
        return self.token_exit is not None

    def replace(self, **changes: Any) -> Plan:
        """This plan with ``changes`` (any field, e.g. ``skip_attention=[1]`` or ``visual_exit_layer=8``)."""
        fields = {"skip_attention": self.skip_attention, "skip_mlp": self.skip_mlp}
        fields |= {"candidates": self.candidates, **self.token_fields(), **changes}
        return Plan(**fields)

    def skips_only(self) -> Plan:
        """This plan without its visual-token exit."""
        return Plan(skip_attention=self.skip_attention, skip_mlp=self.skip_mlp)

    def with_skips(self, skip_attention: Any = None, skip_mlp: Any = None) -> Plan:
        """This plan with other skipped modules (``None`` keeps the current list); token exit is kept."""
        return self.replace(
            skip_attention=self.skip_attention if skip_attention is None else skip_attention,
            skip_mlp=self.skip_mlp if skip_mlp is None else skip_mlp,
        )

    def validate_for(self, num_layers: int) -> None:
        """Check the plan against a model with ``num_layers`` decoder layers.

        Raises:
            ValueError: an index is out of range (the message gives the allowed range), or the plan
                names encoder sublayers (``"text.1.cross"``), which a decoder host does not have.
        """
        if uses_names(self):
            named = [*self.skip_attention, *self.skip_mlp]
            raise ValueError(
                f"the plan names encoder sublayers {named}, but this is a decoder host, whose plans take "
                "integer layer indices (e.g. Plan(skip_attention=[3, 5])); sublayer names are for the "
                "two-stream encoder hosts (BridgeTower)"
            )
        for name in _LAYER_LISTS:
            bad = [i for i in getattr(self, name) if i >= num_layers]
            if bad:
                raise ValueError(
                    f"Plan.{name} names layer(s) {bad}, but the model has {num_layers} decoder layers; "
                    f"allowed indices are 0..{num_layers - 1}"
                )
        for name, (_, spec) in _token_fields().items():
            value = self.token_fields()[name]
            if spec.layer and value is not None and value > num_layers:
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
        d: dict[str, Any] = {name: list(getattr(self, name)) for name in _LAYER_LISTS}
        d |= {**self.token_fields(), "candidates": self.candidates, "format_version": _FORMAT_VERSION}
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


def _from_fields(data: dict[str, Any]) -> Plan:
    return Plan.from_dict(data)
