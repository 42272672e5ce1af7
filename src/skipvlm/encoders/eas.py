"""The EAS model of a two-stream encoder host (``shared/METHODS.md`` §2, §3, §7).

:func:`get_encoder_eas_model` (what :func:`skipvlm.get_eas_model` calls for a BridgeTower model) freezes
the model, wraps every co-attention layer (:class:`~skipvlm.encoders.layers.CoLayer`) and gives each
stream of each layer its :class:`~skipvlm.encoders.adapters.StreamAdapters`: a replace-PIA in every
skipped attention sublayer, an adapt-PIA in every kept one (``adapt_layers="kept"``), a ReLU bottleneck
in each stream of a layer DAS skips whole. What trains: the adapters and, with ``train_head``, the task
head on top of the ``BridgeTowerModel`` (every parameter outside it; a new answer classifier must learn).

Saved as the decoder hosts' EAS models are: ``eas_config.json`` (format, config, the plan that runs,
the base model's signature) and ``adapter_model.safetensors`` (adapters as
``<stream>.<layer>.<replace|adapt|das>...``, the head as ``head.<name>``), each written atomically.
Merging is refused: the sublayers are post-norm, so ``LN(h + PIA(h))`` does not fold into a weight
(METHODS §7).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from skipvlm.eas import (
    ADAPTER_FILE,
    CONFIG_FILE,
    _check_signature,
    _check_state,
    _read_meta,
    read_safetensors,
)
from skipvlm.encoders.adapters import StreamAdapters
from skipvlm.encoders.host import HOST, backbone
from skipvlm.encoders.layers import CoLayer
from skipvlm.encoders.names import ATTENTION_KINDS, layer_names, whole_layers
from skipvlm.io import atomic_path, atomic_write_text
from skipvlm.plan import CANDIDATE_KINDS, Plan, name_key

__all__ = ["EncoderEASConfig", "EncoderEASModel", "encoder_config_for_plan", "get_encoder_eas_model"]

_FORMAT_VERSION = 2  # the decoder EAS models' format version: the same files and meta keys
_HEAD_PREFIX = "head."
NOT_MERGEABLE = (
    "BridgeTower's sublayers are post-norm, h <- LN(h + PIA(h)), so a PIA does not fold into a weight "
    "(METHODS §7); run the EAS model unmerged (it skips the attentions' work all the same)"
)


def _names(field_name: str, values: Any, kinds: tuple[str, ...]) -> list[str]:
    plan = Plan(skip_attention=values) if field_name != "skip_mlp" else Plan(skip_mlp=values)
    out = list(plan.skip_attention or plan.skip_mlp)
    bad = [v for v in out if not isinstance(v, str) or name_key(v)[2] not in kinds]
    if bad:
        raise ValueError(
            f"EncoderEASConfig.{field_name} holds {bad}; it takes sublayer names '<stream>.<layer>.<kind>' "
            f"with kind in {list(kinds)} (e.g. 'text.1.{kinds[0]}')"
        )
    return out


@dataclass
class EncoderEASConfig:
    """How to build the EAS model of an encoder host. Serialised as JSON beside the adapter weights.

    Args:
        skip_attention: attention sublayers skipped and replaced by a replace-PIA (``"text.1.cross"``).
        skip_mlp: FFNs skipped plainly (``"image.0.ffn"``; the MLP ablation of the search).
        skip_layers: co-attention layers skipped whole (both streams), each stream with a DAS adapter.
        replace_dim: replace-PIA bottleneck d_r (144 in the EAS paper's METER runs); also the DAS width.
        adapt_dim: adapt-PIA bottleneck d_a on kept attention sublayers.
        adapt_layers: ``"kept"``: adapt-PIA on every kept attention sublayer; ``"none"``.
        supernet: adapters of ``candidates`` everywhere, so skips can move (the search trains this).
        candidates: what a supernet may skip: ``attention``, ``mlp``, ``attention_or_mlp`` or ``layer``.
        groups / scale / temperature / dropout: G, s, tau and the dropout rate of PIA (METHODS §2).
        train_head: also train the task head (every parameter outside the ``BridgeTowerModel``).
        init_seed: seed of the adapters' initialisation.

    Raises:
        ValueError: a field is out of range or holds layer indices where names belong.
    """

    skip_attention: list[str] = field(default_factory=list, metadata={"help": "attention sublayers skipped"})
    skip_mlp: list[str] = field(default_factory=list, metadata={"help": "FFNs skipped ('text.0.ffn')"})
    skip_layers: list[int] = field(
        default_factory=list, metadata={"help": "co-attention layers skipped whole, with DAS adapters"}
    )
    replace_dim: int = field(default=144, metadata={"help": "replace-PIA bottleneck width d_r"})
    adapt_dim: int = field(default=8, metadata={"help": "adapt-PIA bottleneck width d_a"})
    adapt_layers: str = field(
        default="kept", metadata={"help": "'kept': adapt-PIA on kept attentions; 'none'"}
    )
    supernet: bool = field(default=False, metadata={"help": "adapters everywhere, so skips can move"})
    candidates: str = field(default="attention", metadata={"help": "what a supernet may skip"})
    groups: int = field(default=2, metadata={"help": "block-diagonal groups G of the up-projections"})
    scale: float = field(default=1.0, metadata={"help": "adapter output scale s"})
    temperature: float = field(default=10.0, metadata={"help": "router softmax temperature tau"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate on the adapter bottleneck"})
    train_head: bool = field(default=True, metadata={"help": "also train the task head"})
    init_seed: int = field(default=0, metadata={"help": "seed of the adapters' initialisation"})

    def __post_init__(self) -> None:
        self.skip_attention = _names("skip_attention", self.skip_attention, ATTENTION_KINDS)
        self.skip_mlp = _names("skip_mlp", self.skip_mlp, ("ffn",))
        self.skip_layers = list(Plan(skip_attention=self.skip_layers).skip_attention)
        if any(isinstance(v, str) for v in self.skip_layers):
            raise ValueError("EncoderEASConfig.skip_layers takes co-attention layer indices, e.g. [2]")
        clash = [n for n in (*self.skip_attention, *self.skip_mlp) if name_key(n)[1] in self.skip_layers]
        if clash:
            raise ValueError(
                f"EncoderEASConfig: {clash} lie in skip_layers {self.skip_layers}; a layer skipped whole is "
                "listed in skip_layers only"
            )
        if self.candidates not in CANDIDATE_KINDS:
            raise ValueError(
                f"EncoderEASConfig.candidates must be one of {CANDIDATE_KINDS}, got {self.candidates!r}"
            )
        if self.adapt_layers not in ("kept", "none"):
            raise ValueError(
                f"EncoderEASConfig.adapt_layers must be 'kept' or 'none', got {self.adapt_layers!r}"
            )
        for name in ("replace_dim", "adapt_dim", "groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderEASConfig.{name} must be a positive integer, got {value!r}")
            if name != "groups" and value % self.groups:
                raise ValueError(
                    f"EncoderEASConfig.{name}={value} must be a multiple of groups={self.groups}"
                )
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"EncoderEASConfig.{name} must be a finite number, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"EncoderEASConfig.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"EncoderEASConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderEASConfig:
        """Build from :meth:`to_dict` output; unknown fields are an error (a newer or foreign file)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EncoderEASConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def plan(self) -> Plan:
        """The skip plan this config asks for (a DAS layer skips all six of its sublayers)."""
        attention, ffn = list(self.skip_attention), list(self.skip_mlp)
        for i in self.skip_layers:
            a, f = layer_names(i)
            attention, ffn = attention + a, ffn + f
        return Plan(skip_attention=attention, skip_mlp=ffn)

    def layout(self, stream: str, layer: int) -> dict[str, Any]:
        """The adapters of one stream of one layer: ``{"replace": kinds, "adapt": kinds, "das": bool}``."""
        kinds = ATTENTION_KINDS
        if self.supernet:
            replace = kinds if self.candidates in ("attention", "attention_or_mlp") else ()
            return {"replace": replace, "adapt": self._adapt(kinds), "das": self.candidates == "layer"}
        skipped = set(self.plan().skip_attention)
        replace = tuple(k for k in kinds if f"{stream}.{layer}.{k}" in self.skip_attention)
        kept = tuple(k for k in kinds if f"{stream}.{layer}.{k}" not in skipped)
        return {"replace": replace, "adapt": self._adapt(kept), "das": layer in self.skip_layers}

    def _adapt(self, kinds: tuple[str, ...]) -> tuple[str, ...]:
        return kinds if self.adapt_layers == "kept" else ()


def encoder_config_for_plan(
    plan: Plan, candidates: str, template: EncoderEASConfig | None = None, num_layers: int | None = None
) -> EncoderEASConfig:
    """A fixed-plan :class:`EncoderEASConfig` that skips what a searched ``plan`` skips (``layer``
    candidates: the whole layers as DAS layers)."""
    cfg = replace(template) if template is not None else EncoderEASConfig()
    cfg.supernet, cfg.candidates = False, "attention"
    if candidates == "layer":
        layers = {name_key(n)[1] for n in (*plan.skip_attention, *plan.skip_mlp)}
        whole = whole_layers(plan, num_layers if num_layers is not None else max(layers, default=-1) + 1)
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = whole, [], []
    else:
        cfg.skip_layers, cfg.skip_attention, cfg.skip_mlp = [], list(plan.skip_attention), list(plan.skip_mlp)
    return EncoderEASConfig.from_dict(cfg.to_dict())


def _signature(model: nn.Module) -> dict[str, Any]:
    core = backbone(model)
    return {
        "model_type": core.config.model_type,
        "num_layers": int(core.config.num_hidden_layers),
        "hidden_size": int(core.config.hidden_size),
        "head": type(model).__name__,
    }


class EncoderEASModel(nn.Module):
    """An encoder host model with skipped sublayers and PIA / DAS adapters; build it with
    :func:`skipvlm.get_eas_model` (or :func:`get_encoder_eas_model`).

    Attribute look-ups it does not answer itself (``config``, ``device``, ...) go to the base model.

    Args:
        base_model: ``BridgeTowerModel`` or a head model on it; modified in place (frozen, wrapped).
        config: the :class:`EncoderEASConfig`.

    Raises:
        ValueError: the model already has adapters, or the config names sublayers it does not have.
    """

    mergeable = False  # the training loop skips the static-merge calibration for it

    def __init__(self, base_model: nn.Module, config: EncoderEASConfig):
        super().__init__()
        core = backbone(base_model)
        num_layers = HOST.num_layers(core)
        plan = config.plan()
        HOST.validate(plan, num_layers)
        if config.skip_layers and max(config.skip_layers) >= num_layers:
            raise ValueError(
                f"EncoderEASConfig.skip_layers {config.skip_layers} names layers the model lacks; it has "
                f"{num_layers} co-attention layers (0..{num_layers - 1})"
            )
        if any(isinstance(layer, CoLayer) and layer.held is not None for layer in _layers(core)):
            raise ValueError(
                "this model already has EAS adapters (get_eas_model and EncoderEASModel.from_pretrained "
                "change the base model in place); load a fresh base model for another EAS model"
            )
        self.base_model = base_model
        object.__setattr__(self, "_config", config)
        base_model.requires_grad_(False)
        hidden = int(core.config.hidden_size)
        reference = next(core.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            for layer in HOST.wrap_all(base_model):
                spec = config.layout(layer.stream, layer.index)
                adapters = StreamAdapters(
                    hidden,
                    spec["replace"],
                    spec["adapt"],
                    spec["das"],
                    replace_dim=config.replace_dim,
                    adapt_dim=config.adapt_dim,
                    groups=config.groups,
                    scale=config.scale,
                    temperature=config.temperature,
                    dropout=config.dropout,
                )
                layer.attach(adapters.to(device=reference.device, dtype=reference.dtype))
        if config.train_head:
            for p in self.head_parameters().values():
                p.requires_grad_(True)
        HOST.apply_plan(base_model, plan)
        self.train(base_model.training)

    # --- plumbing ---------------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    def get_base_model(self) -> nn.Module:
        """The transformers model, so every skipvlm function accepts the EAS model where it takes a model."""
        return self.base_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward (a head model's ``labels`` give ``.loss``)."""
        return self.base_model(*args, **kwargs)

    @property
    def plan(self) -> Plan:
        """The skip plan the model runs now."""
        return HOST.current_plan(self.base_model)

    def set_plan(self, plan: Plan) -> None:
        """Run ``plan`` from now on (the same as ``skipvlm.apply_plan(model, plan)``).

        Raises:
            ValueError: the plan names what the model lacks, or a sublayer lacks the adapter it would need
                (build with ``supernet=True`` to move skips anywhere).
        """
        HOST.apply_plan(self.base_model, plan)

    @property
    def eas_config(self) -> EncoderEASConfig:
        """The configuration, with the skips of the plan that runs now."""
        plan, core = self.plan, backbone(self.base_model)
        das = sorted({layer.index for layer in _layers(core) if isinstance(layer, CoLayer) and layer.das})
        return replace(
            self._config,
            skip_layers=das,
            skip_attention=[n for n in plan.skip_attention if name_key(n)[1] not in das],
            skip_mlp=[n for n in plan.skip_mlp if name_key(n)[1] not in das],
        )

    def adapters(self) -> dict[str, StreamAdapters]:
        """The adapters by ``"<stream>.<layer>"``."""
        core = backbone(self.base_model)
        return {
            f"{layer.stream}.{layer.index}": layer.held
            for layer in _layers(core)
            if isinstance(layer, CoLayer) and layer.held is not None
        }

    def head_parameters(self) -> dict[str, nn.Parameter]:
        """The task head's parameters (those of the base model outside its ``BridgeTowerModel``), by name."""
        core = backbone(self.base_model)
        inside = {id(p) for p in core.parameters()}
        return {n: p for n, p in self.base_model.named_parameters() if id(p) not in inside}

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameter count, total parameter count)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    # --- persistence ------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes: adapters, and the head when it trains."""
        state = {f"{key}.{k}": v for key, a in self.adapters().items() for k, v in a.state_dict().items()}
        if self._config.train_head:
            state |= {f"{_HEAD_PREFIX}{k}": v for k, v in self.head_parameters().items()}
        return state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps of this model (the training loops ask every model for it)."""
        return self.adapter_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: Any = "state dict") -> None:
        """Load what :meth:`trainable_state_dict` returned (names and shapes must match, values be finite)."""
        expected = self.adapter_state_dict()
        _check_state(state, {k: v.shape for k, v in expected.items()}, source)
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``eas_config.json`` and ``adapter_model.safetensors`` to ``path`` (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        with atomic_path(path / ADAPTER_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": "skipvlm"})
        meta = {
            "format_version": _FORMAT_VERSION,
            "eas_config": self._config.to_dict(),  # the adapters built, whatever runs now
            "plan": self.plan.to_dict(),  # what runs now
            "base_model": _signature(self.base_model),
        }
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike) -> EncoderEASModel:
        """Rebuild the EAS model on ``base_model`` from a folder written by :meth:`save_pretrained`.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: the adapters were saved for another base model or head, or the tensors do not
                match the config; the base model is left unchanged then.
        """
        path = Path(path)
        meta = _read_meta(path)
        saved, here = meta.get("base_model", {}), _signature(base_model)
        _check_signature(path, saved, here)
        try:
            config = EncoderEASConfig.from_dict(meta["eas_config"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path / CONFIG_FILE} has no valid encoder eas_config ({err})") from None
        weights = path / ADAPTER_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; the folder holds no adapter weights")
        state = read_safetensors(weights)
        trial = _expected_shapes(base_model, config)
        _check_state(state, trial, weights)
        model = cls(base_model, config)
        model.load_trainable_state_dict(state, source=weights)
        model.set_plan(Plan.from_dict(meta["plan"]))
        return model

    # --- what a post-norm host cannot do -----------------------------------------------------------------

    def merge_and_unload(self, mode: str = "static") -> nn.Module:
        """Refused: see ``NOT_MERGEABLE``.

        Raises:
            ValueError: always.
        """
        raise ValueError(f"cannot merge the adapters of a BridgeTower EAS model: {NOT_MERGEABLE}")

    def export_merged(self, path: str | os.PathLike, processor: Any = None) -> Path:
        """Refused: see :meth:`merge_and_unload`."""
        raise ValueError(f"cannot export a merged BridgeTower EAS model: {NOT_MERGEABLE}")

    def calibrate(self, batches: Iterable[dict[str, Any]], progress: bool = True) -> int:
        """Refused: the calibration means only serve a merge, which this host does not offer."""
        raise ValueError(f"calibrate() gathers the static merge's means, and {NOT_MERGEABLE}")


def _layers(core: nn.Module) -> list[nn.Module]:
    return [*core.cross_modal_text_layers, *core.cross_modal_image_layers]


def _expected_shapes(base_model: nn.Module, config: EncoderEASConfig) -> dict[str, torch.Size]:
    """The tensor names and shapes an EAS model of ``config`` on ``base_model`` saves (built on the meta
    device, so a bad folder is found before the base model changes)."""
    core = backbone(base_model)
    shapes: dict[str, torch.Size] = {}
    with torch.device("meta"):
        for stream in ("text", "image"):
            for i in range(HOST.num_layers(core)):
                spec = config.layout(stream, i)
                adapters = StreamAdapters(
                    int(core.config.hidden_size),
                    spec["replace"],
                    spec["adapt"],
                    spec["das"],
                    replace_dim=config.replace_dim,
                    adapt_dim=config.adapt_dim,
                    groups=config.groups,
                )
                shapes |= {f"{stream}.{i}.{k}": v.shape for k, v in adapters.state_dict().items()}
    if config.train_head:
        inside = {id(p) for p in core.parameters()}
        shapes |= {
            f"{_HEAD_PREFIX}{n}": p.shape for n, p in base_model.named_parameters() if id(p) not in inside
        }
    return shapes


def get_encoder_eas_model(base_model: nn.Module, config: EncoderEASConfig | None = None) -> EncoderEASModel:
    """Freeze ``base_model`` (``BridgeTowerModel`` or a head on it), skip ``config``'s sublayers and inject
    the adapters. A fresh model computes exactly the plain skip plan (every adapter starts as the identity).

    Raises:
        TypeError: ``config`` is a decoder host's ``EASConfig``.
        ValueError: see :class:`EncoderEASModel`.
    """
    config = EncoderEASConfig() if config is None else config
    if not isinstance(config, EncoderEASConfig):
        raise TypeError(
            f"a BridgeTower model takes a skipvlm.encoders.eas.EncoderEASConfig (sublayer names such as "
            f"'text.1.cross'), got {type(config).__name__}"
        )
    return EncoderEASModel(base_model, config)
