"""The EAS model: a base model with attentions skipped and PIA adapters injected (``shared/METHODS.md`` §2).

:func:`get_eas_model` freezes a supported transformers model, puts skipvlm's layer loop in place of its
text model (:class:`~skipvlm.runtime.SkipDecoder`) and gives each layer's route its adapters
(:class:`~skipvlm.adapters.LayerAdapters`): a replace-PIA in every layer whose attention is skipped
and, with ``adapt_layers="kept"``, an adapt-PIA in every layer whose attention runs; with
``mlp_replace="pia"``, an FFN-PIA in every layer whose MLP is skipped. Only the adapters
(parameters named ``...routes.<layer>.adapters...``) and, if asked, the multimodal projector train.
The wrapped model keeps the Hugging Face interface (``forward`` with ``labels`` -> loss, ``generate``);
in training the adapters pool over the prompt tokens found from the labels, so answers never leak
into the pooled vector.

:class:`EASConfig` (in :mod:`skipvlm.eas_config`, re-exported here) says what to build. The switches of
the paper's PIA design table (``single_path``, ``info_exchange``, ``freeze_pooled``), the replace-PIA's
input (``replace_input``) and the FFN replacement (``mlp_replace``) are its fields; their formulas are in
:mod:`skipvlm.pia` and :mod:`skipvlm.adapters`.

Adapters are saved as ``eas_config.json`` + ``adapter_model.safetensors`` (adapters only) and merged
into the weights by :mod:`skipvlm.merge`. File format 2 names tensors
``routes.<layer>.adapters.<kind>...``; format 1 (``pia_adapters.<kind>.<layer>...``, written before
the routes) is still read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from skipvlm.adapters import DASRoute, LayerAdapters
from skipvlm.arch import ArchFacts, arch_facts, decoder_slot, encoder_host
from skipvlm.eas_config import EASConfig
from skipvlm.io import atomic_path, atomic_write_text
from skipvlm.pia import AdaptPIA, BottleneckAdapter, ReplacePIA, prompt_mask_from_labels
from skipvlm.plan import Plan
from skipvlm.runtime import SkipDecoder, apply_plan

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "EASConfig", "EASModel", "get_eas_model"]

logger = logging.getLogger(__name__)

CONFIG_FILE = "eas_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
_FORMAT_VERSION = 2
_PROJECTOR_PREFIX = "projector."
_ROUTES_PREFIX = "routes."  # every adapter tensor of a decoder: routes.<layer>.adapters.<kind>....
_V1_KEY = re.compile(r"^pia_adapters\.(replace|adapt|bottleneck)\.(\d+)\.(.+)$")  # format 1


def _base_signature(facts: ArchFacts) -> dict[str, Any]:
    """What adapters depend on in the base model; saved with them and checked on load."""
    return {
        "model_type": facts.model_type,
        "text_model_type": facts.text_model_type,
        "num_layers": facts.num_layers,
        "hidden_size": facts.hidden_size,
        "intermediate_size": facts.intermediate_size,
    }


class EASModel(nn.Module):
    """A base model with skipped attentions and PIA adapters; build it with :func:`get_eas_model`.

    Attribute look-ups it does not answer itself (``config``, ``device``, ``dtype``, ...) go to the
    base model.

    Args:
        base_model: a supported transformers model; modified in place (frozen, adapters injected).
        config: the :class:`EASConfig`.
    """

    def __init__(self, base_model: nn.Module, config: EASConfig):
        super().__init__()
        facts = arch_facts(base_model)
        self.base_model = base_model
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "facts", facts)

        for p in base_model.parameters():
            p.requires_grad_(False)
        parent, name, decoder = decoder_slot(base_model, facts)
        if isinstance(decoder, SkipDecoder) and decoder.owns_modules():
            raise ValueError(
                "this model already has EAS adapters (get_eas_model, search and EASModel.from_pretrained "
                "change the base model in place); load a fresh base model for another EAS model, or keep "
                "using the EASModel you have (set_plan, save_pretrained)"
            )
        plan = config.plan()
        plan.validate_for(facts.num_layers)
        if not isinstance(decoder, SkipDecoder):
            decoder = SkipDecoder(decoder, facts, Plan())
            setattr(parent, name, decoder)
        reference = next(base_model.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            adapters = _build_adapters(facts, config)
        decoder.attach(
            {i: a.to(device=reference.device, dtype=reference.dtype) for i, a in adapters.items()}, plan
        )
        apply_plan(base_model, plan)  # the plan in the config, the hooks on the top-level model
        if config.train_projector:
            for p in self.projector().parameters():
                p.requires_grad_(True)
        self.train(base_model.training)

    # --- plumbing ---------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    @property
    def decoder(self) -> SkipDecoder:
        """The runtime wrapper that runs the text model's layers."""
        return decoder_slot(self.base_model, self.facts)[2]

    def get_base_model(self) -> nn.Module:
        """The transformers model (as PEFT models hand theirs out), so every skipvlm function accepts an
        EAS model where it takes a model."""
        return self.base_model

    @property
    def adapters(self) -> AdapterSet:
        """The adapters, by kind and layer (``adapters.replace["3"]``); they live in the layers' routes."""
        adapters = AdapterSet(self.decoder)
        if not adapters.layers:
            raise ValueError(
                "the adapters of this model were already merged by merge_and_unload; train, save or "
                "export_merged before merging"
            )
        return adapters

    @property
    def eas_config(self) -> EASConfig:
        """The configuration, with the skips of the plan that runs now."""
        plan, routes = self.plan, self.decoder.routes
        das = [i for i, route in enumerate(routes) if isinstance(route, DASRoute)]
        return replace(
            self._config,
            skip_layers=das,
            skip_attention=[i for i in plan.skip_attention if i not in das],
            skip_mlp=[i for i in plan.skip_mlp if i not in das],
        )

    @property
    def skip_attention(self) -> list[int]:
        """The layers whose attention is skipped now."""
        return list(self.plan.skip_attention)

    def projector(self) -> nn.Module:
        """The multimodal projector of the base model.

        Raises:
            ValueError: the model is text-only.
        """
        if self.facts.projector_path is None:
            raise ValueError(f"a {self.facts.model_type} model has no multimodal projector to train")
        return self.base_model.get_submodule(self.facts.projector_path)

    # --- Hugging Face interface ---------------------------------------------------------------------

    def forward(self, *args: Any, labels: torch.Tensor | None = None, prompt_mask=None, **kwargs: Any) -> Any:
        """The base model's forward. The adapters pool over ``prompt_mask`` (B, T) if given; else, with
        ``labels``, over the tokens before each row's first supervised label (padding excluded); else
        over all non-padding tokens."""
        if prompt_mask is None and labels is not None:
            prompt_mask = prompt_mask_from_labels(labels, kwargs.get("attention_mask"))
        with self.decoder.inputs.pooling(prompt_mask):
            return self.base_model(*args, labels=labels, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``; the adapters pool over the prompt at prefill, then stay frozen.

        The prompt is the 2-D ``attention_mask``'s tokens, even where ``generate`` hands the model prepared
        masks (a static cache: ``cache_implementation="static"``), and for every beam / returned sequence
        of a prompt (``generate`` repeats each row for them)."""
        config = kwargs.get("generation_config") or self.base_model.generation_config
        if kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None)) is not None:
            raise ValueError(
                "the adapters pool over the whole prompt in one prefill, so generate(..., "
                "prefill_chunk_size=...) would pool over its first chunk only; drop prefill_chunk_size, "
                "or merge the adapters first (merge_and_unload)"
            )
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        with self.decoder.inputs.pooling(mask, repeats=True):
            return self.base_model.generate(*args, **kwargs)

    # --- adapters -------------------------------------------------------------------------------------

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameter count, total parameter count)."""
        total = trainable = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts, like PEFT models do."""
        trainable, total = self.trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    @property
    def plan(self) -> Plan:
        """The skip plan the model runs now."""
        return self.decoder.plan

    def set_skip_attention(self, layers: Iterable[int]) -> None:
        """Move the skipped attentions to ``layers`` (a supernet's move); see :meth:`set_plan`."""
        self.set_plan(self.plan.with_skips(skip_attention=list(layers)))

    def set_plan(self, plan: Plan) -> None:
        """Run ``plan`` from now on (the same as ``skipvlm.apply_plan(model, plan)``): skipped attentions
        use their replace-PIA, layers skipped whole their DAS adapter (or nothing), kept attentions their
        adapt-PIA (see :class:`~skipvlm.adapters.LayerAdapters`).

        Raises:
            ValueError: an index is out of range, or a layer lacks the adapter it would need (build
                with ``EASConfig(supernet=True, candidates=...)`` to be able to skip any layer).
        """
        apply_plan(self, plan)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[dict[str, Any]], progress: bool = True) -> int:
        """Gather the router-weight and pooled-path means that ``merge_and_unload("static")`` uses.

        Args:
            batches: model-ready batches of training prompts (``labels`` mark the answers, which are
                not pooled).
            progress: show a progress bar.

        Returns:
            The number of examples seen.
        """
        adapters = self.adapters
        for module in adapters.modules():
            if hasattr(module, "reset_calibration"):
                module.reset_calibration()
        was_training = self.training
        adapters.collecting = True
        self.eval()
        seen = 0
        try:
            for batch in tqdm(batches, desc="calibrating", disable=not progress, leave=False):
                self(**batch, use_cache=False)
                seen += int(batch["input_ids"].shape[0])
        finally:
            adapters.collecting = False
            self.train(was_training)
        if seen == 0:
            raise ValueError("calibrate() got no batches; pass an iterable of training batches")
        logger.info("calibrated the adapters' router means over %d examples", seen)
        return seen

    # --- persistence ------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes: the adapters (and the projector if trained)."""
        self.adapters  # noqa: B018  (raises once they are merged)
        state = _routes_state(self.decoder.routes)
        if self.eas_config.train_projector:
            state |= {f"{_PROJECTOR_PREFIX}{k}": v for k, v in self.projector().state_dict().items()}
        return state

    def optimizer_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters in the order the training loops hand them to the optimiser: those
        of the base model (a trained projector) first, then the adapters by kind (replace-PIA, adapt-PIA,
        DAS bottleneck, FFN-PIA) and layer.

        The order does not change the maths, but it is the order in which gradient clipping sums
        floats; it is the order format-1 models registered their adapters in, so a run gives the same
        numbers as before the routes held them.
        """
        adapters = AdapterSet(self.decoder)
        own = {id(p) for p in adapters.parameters()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in own]
        for kind in (adapters.replace, adapters.adapt, adapters.bottleneck, adapters.ffn):
            params += [p for module in kind.values() for p in module.parameters() if p.requires_grad]
        return params

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps of this model (the training loops ask every model for it)."""
        return self.adapter_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: Any = "state dict") -> None:
        """Load what :meth:`trainable_state_dict` returned (see :meth:`load_adapter_state_dict`)."""
        self.load_adapter_state_dict(state, source=source)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``eas_config.json`` and ``adapter_model.safetensors`` (adapters only) to ``path``.

        Each file is written atomically. Returns the folder.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        with atomic_path(path / ADAPTER_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": "skipvlm"})
        meta = {
            "format_version": _FORMAT_VERSION,
            "eas_config": self._config.to_dict(),  # the adapters built, whatever runs now
            "plan": self.plan.skips_only().to_dict(),  # what runs now
            "base_model": _base_signature(self.facts),
        }
        atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike) -> EASModel:
        """Rebuild an EAS model on ``base_model`` from a folder written by :meth:`save_pretrained` (a
        BridgeTower model gets its :class:`~skipvlm.encoders.eas.EncoderEASModel`).

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            ValueError: the adapters were saved for another architecture, hidden size or layer count,
                or the file's tensors do not match the config.
        """
        encoder = encoder_host(base_model)
        if encoder is not None:  # a two-stream encoder host (METHODS §7) loads its own EAS model
            return encoder.load_eas_model(base_model, path)
        path = Path(path)
        meta = _read_meta(path)
        facts = arch_facts(base_model)
        saved, here = meta.get("base_model", {}), _base_signature(facts)
        _check_signature(path, saved, here)
        try:
            config = EASConfig.from_dict(meta["eas_config"])
        except (KeyError, TypeError) as err:
            raise ValueError(
                f"{path / CONFIG_FILE} has no valid eas_config ({type(err).__name__}: {err}); the file is "
                "damaged or was not written by EASModel.save_pretrained"
            ) from None
        weights = path / ADAPTER_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing; the folder holds no adapter weights")
        state = read_safetensors(weights)
        if meta["format_version"] == 1:
            state = _from_format_1(state)
        # Everything that can fail is checked on a copy of the layout first, so a bad folder leaves the
        # caller's model exactly as it was.
        trial = {k: v.shape for k, v in _adapter_shapes(facts, config).items()}
        if config.train_projector:
            if facts.projector_path is None:
                raise ValueError(f"{path}: the adapters train a projector, which a {facts.model_type} lacks")
            projector = base_model.get_submodule(facts.projector_path)
            trial |= {f"{_PROJECTOR_PREFIX}{k}": v.shape for k, v in projector.state_dict().items()}
        _check_state(state, trial, weights)
        model = cls(base_model, config)
        model.load_adapter_state_dict(state, source=weights)
        if "plan" in meta:  # format 2: the plan that ran when saved (format 1: the config's)
            model.set_plan(Plan.from_dict(meta["plan"]))
        return model

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: Any = "state dict") -> None:
        """Load tensors written by :meth:`adapter_state_dict` (names and shapes must match exactly, and
        every value must be finite)."""
        expected = self.adapter_state_dict()
        state = _from_format_1(state)  # a file or training checkpoint written before the routes
        _check_state(state, {k: v.shape for k, v in expected.items()}, source)
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v)

    # --- merging ---------------------------------------------------------------------------------------

    def merge_and_unload(self, mode: str = "static") -> nn.Module:
        """Fold the adapters into the base weights and return the base model (see :mod:`skipvlm.merge`).

        Args:
            mode: ``"static"`` (calibration means; any batch size; exportable) or ``"per_example"``
                (each prompt's own router weights and pooled vector, merged at prefill; batch size 1).
        """
        from skipvlm.merge import merge_and_unload

        return merge_and_unload(self, mode)

    def export_merged(self, path: str | os.PathLike, processor: Any = None) -> Path:
        """Write the ``static`` merge as a checkpoint stock transformers loads, with the processor beside
        it (``processor``, else the base checkpoint's; see :func:`skipvlm.export.export_merged`)."""
        from skipvlm.export import export_merged

        return export_merged(self, path, processor)


def _check_state(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], source: Any) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match this EAS model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (of {len(missing)} / {len(unexpected)}); was it saved with another "
            "EASConfig?"
        )
    bad = [k for k, v in state.items() if v.shape != shapes[k]]
    if bad:
        raise ValueError(
            f"{source}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, this model needs "
            f"{tuple(shapes[bad[0]])}"
        )
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise ValueError(f"{source}: tensor {nonfinite[0]} holds NaN or infinite values; the file is damaged")


def _build_adapters(facts: ArchFacts, config: EASConfig) -> dict[int, LayerAdapters]:
    """The adapters of ``config`` for a model with ``facts``, by layer (on the current default device).

    Built kind by kind in layer order (replace-PIAs, adapt-PIAs, DAS bottlenecks, FFN-PIAs), so that one
    ``init_seed`` always gives the same initial weights (and the kinds a config did not ask for before
    the FFN-PIA existed draw the same random numbers as then).
    """
    replace_at, adapt_at, bottleneck_at = config.adapter_layout(facts.num_layers)
    c = facts.hidden_size
    pia = dict(groups=config.groups, scale=config.scale, temperature=config.temperature)
    pia |= dict(dropout=config.dropout, paths=1 if config.single_path else 2)
    exchange = dict(info_exchange=config.info_exchange)
    replace = {i: ReplacePIA(c, config.replace_dim, **pia, **exchange) for i in replace_at}
    adapt = {i: AdaptPIA(c, config.adapt_dim, **pia) for i in adapt_at}
    bottleneck = {i: BottleneckAdapter(c, config.replace_dim, config.dropout) for i in bottleneck_at}
    ffn_at = config.ffn_layout(facts.num_layers)
    if config.mlp_replace == "pia" and not ffn_at:
        logger.warning("EASConfig(mlp_replace='pia') builds no FFN-PIA: its plan skips no MLP")
    ffn = {i: ReplacePIA(c, config.replace_dim, **pia, **exchange) for i in ffn_at}
    kept = config.adapt_layers == "kept"
    return {
        i: LayerAdapters(
            replace.get(i),
            adapt.get(i),
            bottleneck.get(i),
            kept,
            ffn=ffn.get(i),
            require_ffn=config.mlp_replace == "pia",
            freeze_pooled=config.freeze_pooled,
            replace_input=config.replace_input,
        )
        for i in range(facts.num_layers)
    }


def _routes_state(routes: Iterable[nn.Module]) -> dict[str, torch.Tensor]:
    """The adapter tensors held by a decoder's routes, named as in the decoder (``routes.<i>....``)."""
    return {
        f"{_ROUTES_PREFIX}{i}.{k}": v for i, route in enumerate(routes) for k, v in route.state_dict().items()
    }


def _adapter_shapes(facts: ArchFacts, config: EASConfig) -> dict[str, torch.Tensor]:
    """The adapter state an EAS model of ``config`` on a model with ``facts`` has, built on the meta
    device (no memory, the caller's model untouched)."""
    with torch.device("meta"):
        adapters = _build_adapters(facts, config)
    return {
        f"{_ROUTES_PREFIX}{i}.adapters.{k}": v for i, a in adapters.items() for k, v in a.state_dict().items()
    }


def _from_format_1(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Format-1 tensor names (``pia_adapters.<kind>.<layer>.…``) renamed as format 2 names them
    (``routes.<layer>.adapters.<kind>.…``)."""
    out = {}
    for key, value in state.items():
        match = _V1_KEY.match(key)
        out[f"{_ROUTES_PREFIX}{match[2]}.adapters.{match[1]}.{match[3]}" if match else key] = value
    return out


class AdapterSet:
    """A view of an EAS model's adapters by kind and layer; the modules live in the layers' routes.

    ``replace`` / ``adapt`` / ``bottleneck`` / ``ffn`` map a layer (as a string) to that kind's module;
    ``use_calibration`` and ``collecting`` switch every layer at once.
    """

    def __init__(self, decoder: SkipDecoder):
        self.layers: dict[int, LayerAdapters] = {
            i: route.adapters
            for i, route in enumerate(decoder.routes)
            if isinstance(route._modules.get("adapters"), LayerAdapters)  # not a per-example merge's
        }

    def _kind(self, kind: str) -> dict[str, nn.Module]:
        return {str(i): getattr(a, kind) for i, a in self.layers.items() if getattr(a, kind) is not None}

    @property
    def replace(self) -> dict[str, nn.Module]:
        return self._kind("replace")

    @property
    def adapt(self) -> dict[str, nn.Module]:
        return self._kind("adapt")

    @property
    def bottleneck(self) -> dict[str, nn.Module]:
        return self._kind("bottleneck")

    @property
    def ffn(self) -> dict[str, nn.Module]:
        return self._kind("ffn")

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(``"<layer>.<name>"``, module) for every module of every layer's adapters."""
        for i, adapters in self.layers.items():
            yield from adapters.named_modules(prefix=str(i))

    def modules(self) -> Iterator[nn.Module]:
        for _, module in self.named_modules():
            yield module

    def parameters(self) -> Iterator[nn.Parameter]:
        for adapters in self.layers.values():
            yield from adapters.parameters()

    @property
    def use_calibration(self) -> bool:
        return any(a.use_calibration for a in self.layers.values())

    @use_calibration.setter
    def use_calibration(self, value: bool) -> None:
        for adapters in self.layers.values():
            adapters.use_calibration = value

    @property
    def collecting(self) -> bool:
        return any(a.collecting for a in self.layers.values())

    @collecting.setter
    def collecting(self, value: bool) -> None:
        for adapters in self.layers.values():
            adapters.collecting = value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a damaged or truncated file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for bad files
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is damaged or truncated"
        ) from None


def _check_signature(path: Path, saved: dict[str, Any], here: dict[str, Any]) -> None:
    """Raise ValueError naming each base-model fact in ``here`` the adapters in ``path`` differ on."""
    wrong = [
        f"{k}: saved for {saved.get(k)!r}, this model has {v!r}" for k, v in here.items() if saved.get(k) != v
    ]
    if wrong:
        raise ValueError(
            f"the adapters in {path} were saved for a different base model ({'; '.join(wrong)}); "
            "load them onto the model they were trained on"
        )


def _read_meta(path: Path) -> dict[str, Any]:
    config = path / CONFIG_FILE
    if not config.is_file():
        hint = "the folder does not exist" if not path.exists() else f"no {CONFIG_FILE} in it"
        raise FileNotFoundError(
            f"cannot load EAS adapters from {path}: {hint}; pass a folder written by EASModel.save_pretrained"
        )
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f"{config} must hold a JSON object, got a {type(meta).__name__}; the file is damaged"
        )
    version = meta.get("format_version")
    if version not in (1, _FORMAT_VERSION):
        raise ValueError(
            f"{config} has format_version {version!r}; this skipvlm reads 1 to {_FORMAT_VERSION}"
        )
    return meta


def get_eas_model(base_model: nn.Module, config: EASConfig) -> EASModel:
    """Freeze ``base_model``, skip ``config.skip_attention`` and inject PIA adapters.

    The adapters start as the identity, so a fresh model with no skips computes exactly what the base
    model computes. With skips it is the plain skip plan only where the replace-PIA's input is
    ``rms(h)`` (``replace_input="rms"``): with the default ``"normed"`` input, an identity replace-PIA
    feeds ``gamma_post * gamma_in * rms(h)`` to the skipped layer's MLP, where the plain skip feeds
    ``gamma_post * rms(h)``; real checkpoints have ``gamma_in`` far from 1. Skipped MLPs start as the
    plain MLP skip (with or without an FFN-PIA).

    Args:
        base_model: a supported transformers model (modified in place).
        config: the :class:`EASConfig`.

    Returns:
        The :class:`EASModel`.

    Raises:
        ValueError: the config names layers the model does not have.
        UnsupportedModelError: the architecture is not supported.
    """
    encoder = encoder_host(base_model)
    if encoder is not None:  # a two-stream encoder host (METHODS §7) builds its own EAS model
        return encoder.eas_model(base_model, config)
    if not isinstance(config, EASConfig):
        raise TypeError(f"get_eas_model needs an skipvlm.EASConfig, got {type(config).__name__}")
    return EASModel(base_model, config)
