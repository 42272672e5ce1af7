"""Export of a merged EAS model as a stock checkpoint, and loading one back (``shared/METHODS.md`` §2).

:func:`export_merged` writes the ``static`` merge (:func:`~skipvlm.merge.merge_and_unload`) so that stock
transformers computes the same function: skipped attentions as ``o_proj = 0``, the merged biases switched
on in the config (Llama ``mlp_bias`` / ``attention_bias``), the plan recorded in the config.
:func:`load_pretrained` loads such a checkpoint (or any stock one) with safetensors only and re-applies its
plan.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from skipvlm.arch import (
    ArchFacts,
    LayerParts,
    arch_facts,
    decoder_slot,
    get_layers,
    model_class,
)
from skipvlm.eas import EASModel
from skipvlm.io import atomic_files
from skipvlm.merge import (
    _active_adapters,
    _calibrated_affine,
    _check_mergeable,
    _fold_layer,
    _refuse_encoder,
    remove_attention,
)
from skipvlm.pia import ReplacePIA
from skipvlm.plan import CONFIG_KEY, Plan
from skipvlm.runtime import apply_plan

__all__ = ["PLAN_KEY", "export_merged", "load_pretrained"]

logger = logging.getLogger(__name__)

PLAN_KEY = CONFIG_KEY  # attribute of a saved checkpoint's config: the plan to re-apply


def _export_biases(facts: ArchFacts, replace: bool, adapt: bool) -> dict[str, bool]:
    """The config switches a stock checkpoint needs to hold the merged biases, or a clear error."""
    text = facts.text_config
    need: dict[str, bool] = {}
    if replace:  # gate / up projections gain a bias
        if not hasattr(text, "mlp_bias"):
            raise ValueError(
                f"a stock {facts.text_model_type} checkpoint ({facts.model_type}) has no MLP biases, "
                "which the merged replace-PIA needs, so it cannot be exported as a stock checkpoint; use "
                "merge_and_unload(mode='static') in skipvlm, or save the adapters with save_pretrained"
            )
        need["mlp_bias"] = True
    if adapt and not _has_qkv_bias(facts):
        if not hasattr(text, "attention_bias"):
            raise ValueError(
                f"a stock {facts.text_model_type} checkpoint ({facts.model_type}) has no q/k/v biases, which "
                "the merged adapt-PIA needs, so it cannot be exported as a stock checkpoint; use "
                "merge_and_unload(mode='static') in skipvlm, or build the model with adapt_layers='none'"
            )
        need["attention_bias"] = True
    return need


def _has_qkv_bias(facts: ArchFacts) -> bool:
    # Qwen2-family attentions always carry q/k/v biases; Llama's follow `attention_bias`.
    return facts.text_model_type.startswith("qwen2") or bool(
        getattr(facts.text_config, "attention_bias", False)
    )


@torch.no_grad()
def export_merged(eas_model: EASModel, path: str | os.PathLike, processor: Any = None) -> Path:
    """Write the ``static`` merge of ``eas_model`` as a checkpoint stock transformers loads.

    The model itself is not changed. Skipped attentions are written with ``o_proj = 0`` (so stock
    transformers computes the same function), biases are switched on in the config where the merge
    needs them, and the skip plan is stored in the config (``skipvlm_plan``) so that
    :func:`load_pretrained` runs the checkpoint fast again. Written to a temporary folder and moved
    into place file by file, so an interrupted export leaves no half-written file, and other files in
    ``path`` are kept.

    The processor (or tokenizer) is saved beside the weights, so every ``skipvlm`` command accepts the
    folder: ``processor`` if given, else the one saved with the base checkpoint (read from the folder
    the base model was loaded from, ``config._name_or_path``).

    Raises:
        ValueError: the architecture's stock config cannot express the merged biases (e.g. Qwen2 MLPs),
            or calibration means are missing.
    """
    if getattr(type(eas_model), "mergeable", True) is False:  # a host that refuses merges says why
        return eas_model.export_merged(path, processor)
    _refuse_encoder(eas_model, "export a merge of")
    facts = eas_model.facts
    base = eas_model.base_model
    plan = eas_model.decoder.plan
    _check_mergeable(eas_model)
    if plan.skip_mlp:
        raise ValueError(
            "export_merged supports attention skips only; this plan also skips MLPs (plainly or with "
            "FFN-PIAs, which a stock checkpoint cannot hold); use merge_and_unload in skipvlm, or save the "
            "adapters"
        )
    layers = get_layers(base, facts)
    eas_model.adapters  # noqa: B018  (raises if they were merged already)
    input_gain = eas_model.eas_config.replace_input == "normed"
    active = {i: a for i, (a, _) in _active_adapters(eas_model.decoder).items() if a is not None}
    replace = any(isinstance(a, ReplacePIA) for a in active.values())
    adapt = any(not isinstance(a, ReplacePIA) for a in active.values())
    need = _export_biases(facts, replace, adapt)

    prefix = f"{facts.decoder_path}.layers"
    routes = f"{facts.decoder_path}.routes."
    parts = facts.parts
    state = {k: v for k, v in base.state_dict().items() if not k.startswith(routes)}
    for i, adapter in active.items():
        is_replace = isinstance(adapter, ReplacePIA)
        affine = _calibrated_affine(i, adapter)
        for name, (w, b) in _fold_layer(layers[i], affine, is_replace, parts, input_gain).items():
            state[f"{prefix}.{i}.{name}.weight"], state[f"{prefix}.{i}.{name}.bias"] = w, b
        if is_replace:
            norm = f"{prefix}.{i}.{parts.pre_mlp_norm}.weight"
            state[norm] = parts.unit_weight(state[norm])
    for i in plan.skip_attention:
        o_proj = f"{prefix}.{i}.{parts.attention}.o_proj.weight"
        state[o_proj] = torch.zeros_like(state[o_proj])
    _fill_zero_biases(state, prefix, layers, need, parts)

    config = copy.deepcopy(base.config)
    text = config.get_text_config(decoder=True)
    for key, value in need.items():
        setattr(text, key, value)
    setattr(config, PLAN_KEY, Plan(skip_attention=plan.skip_attention).to_dict())
    if processor is None:
        processor = _base_processor(base)
    return _save_checkpoint(base, config, state, Path(path), processor)


def _base_processor(model: nn.Module) -> Any:
    """The processor saved in the folder ``model`` was loaded from, or None (with a warning)."""
    from skipvlm.data.chat import load_processor

    source = getattr(model.config, "_name_or_path", "") or ""
    if source and Path(source).is_dir():
        try:
            return load_processor(source)
        except (OSError, ValueError):
            pass
    logger.warning(
        "the export holds no processor or tokenizer (the base model was not loaded from a folder that has "
        "them); pass export_merged(path, processor=...) so that every skipvlm command accepts the folder"
    )
    return None


def _fill_zero_biases(
    state: dict[str, torch.Tensor], prefix: str, layers: nn.ModuleList, need: dict, parts: LayerParts
) -> None:
    """Zero biases for every projection the switched-on config flags give a bias to."""
    names = []
    if need.get("mlp_bias"):
        names += [f"{parts.mlp}.{p}_proj" for p in ("gate", "up", "down")]
    if need.get("attention_bias"):
        names += [f"{parts.attention}.{p}_proj" for p in "qkvo"]
    for i in range(len(layers)):
        for name in names:
            key = f"{prefix}.{i}.{name}.bias"
            if key not in state:
                weight = state[f"{prefix}.{i}.{name}.weight"]
                state[key] = weight.new_zeros(weight.shape[0])


def _save_checkpoint(
    base: nn.Module, config: Any, state: dict[str, torch.Tensor], path: Path, processor: Any
) -> Path:
    with atomic_files(path) as staging:
        base.save_pretrained(staging, state_dict=state)
        config.save_pretrained(staging)  # the stock config plus the switched-on biases and the plan
        if processor is not None:
            processor.save_pretrained(staging)
    logger.info("exported the merged model to %s", path)
    return path


def _check_loading(path: Path, info: dict[str, Any], allow_missing: bool) -> None:
    """Refuse a checkpoint whose tensors do not match the model it loads into."""
    problems = []
    missing = sorted(info.get("missing_keys") or [])
    if missing and not allow_missing:
        problems.append(
            f"{len(missing)} missing (e.g. {missing[0]}; pass allow_missing_weights=True, or "
            "--allow-missing-weights, to initialise them at random)"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        problems.append(f"{len(unexpected)} the model does not have (e.g. {unexpected[0]})")
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        problems.append(f"{len(mismatched)} of the wrong shape (e.g. {mismatched[0]})")
    if problems:
        raise ValueError(f"{path}: the checkpoint's tensors do not match its config: " + "; ".join(problems))
    if missing:
        logger.warning("%s: %d tensors missing, initialised at random", path, len(missing))


def load_pretrained(path: str | os.PathLike, allow_missing_weights: bool = False, **kwargs: Any) -> nn.Module:
    """Load a checkpoint written by :func:`export_merged`, by ``save_pretrained`` of a planned model
    (e.g. after merging LoRA into it), or any supported stock one, and run it fast.

    The model is loaded by its stock transformers class (safetensors only, no remote code); the plan
    stored in its config (``skipvlm_plan``) is re-applied and the skipped attentions' weights are freed.

    Args:
        path: a local checkpoint folder.
        allow_missing_weights: accept a checkpoint that lacks some of the model's tensors (they are
            initialised at random, as transformers does); by default that is an error, as are tensors
            the model does not have, tensors of the wrong shape, and NaN / infinite weights.
        **kwargs: passed to ``from_pretrained`` (e.g. ``dtype``, ``device_map``).

    Raises:
        FileNotFoundError: ``path`` is not a folder with a ``config.json``.
        ValueError: pickled weights only, or missing / unexpected / mismatched / non-finite tensors.
        UnsupportedModelError: the architecture is not supported.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by export_merged")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
        what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
        raise ValueError(
            f"{path} has {what}; skipvlm loads safetensors only and never unpickles a checkpoint (it can run "
            "code). Convert it where you trust it: model.save_pretrained(dir) writes safetensors"
        )
    for fixed in ("trust_remote_code", "use_safetensors", "output_loading_info"):  # set below, always
        kwargs.pop(fixed, None)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    facts = arch_facts(config)
    try:
        model, info = model_class(config).from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, output_loading_info=True, **kwargs
        )
    except OSError:
        raise
    except Exception as err:  # safetensors' own error for a truncated or damaged file
        raise ValueError(f"{path}: the weights cannot be read ({type(err).__name__}: {err})") from None
    _check_loading(path, info, allow_missing_weights)
    nonfinite = [
        n for n, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()
    ]
    if nonfinite:
        raise ValueError(
            f"{path}: {len(nonfinite)} weight tensor(s) hold NaN or infinite values (e.g. {nonfinite[0]}); "
            "the checkpoint is damaged"
        )
    stored = getattr(model.config, PLAN_KEY, None)
    if stored:
        plan = Plan.from_dict(stored)
        apply_plan(model, plan)
        remove_attention(model, list(plan.skip_attention))
    decoder_slot(model, facts)  # the model has the decoder the facts promise
    return model
