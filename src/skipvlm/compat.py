"""transformers' calling conventions, in one place.

skipvlm runs its own decoder-layer loop, so it depends on how transformers passes the KV cache between
its modules, names it in model outputs, builds masks and represents cache layers. Those conventions
change between releases (5.24 renamed the forward keyword and output field ``past_key_values`` to
``cache``), so this module is the only code in skipvlm that names them. Everything else asks here:

* :data:`CACHE_KWARG` / :func:`cache_kwargs`: the keyword under which a forward receives the cache;
* :func:`take_cache`: read the cache a caller passed, under either name, and refuse ambiguity;
* :func:`output_cache` / :func:`decoder_output`: the cache field of model outputs;
* :func:`build_masks`: the stock mask builders (with Gemma 3's bidirectional image blocks);
* :func:`rotary_tables`: the rotary tables, one per layer type where the model keeps several;
* :func:`check_forward_kwargs`: the keywords a text model's ``forward`` may receive and pass on;
* :data:`DEEPSTACK_MASK_KWARG` / :data:`DEEPSTACK_EMBEDS_KWARG`: the keywords under which Qwen3-VL's
  text model receives its DeepStack visual features;
* :data:`TESTED` / :func:`check_version`: the releases this skipvlm was tested with;
* :class:`StaticCache` / :class:`StaticLayer`: the preallocated cache (``cache_implementation="static"``);
* :func:`compiling`: whether the code runs under ``torch.compile``'s tracing.
"""

from __future__ import annotations

import inspect
import logging
import typing
import warnings
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache, DummyLayer, DynamicCache, StaticCache, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

__all__ = [
    "CACHE_KWARG",
    "DEEPSTACK_EMBEDS_KWARG",
    "DEEPSTACK_MASK_KWARG",
    "TESTED",
    "Cache",
    "DummyLayer",
    "DynamicCache",
    "StaticCache",
    "StaticLayer",
    "build_masks",
    "cache_kwargs",
    "check_forward_kwargs",
    "check_version",
    "compiling",
    "decoder_output",
    "layer_length",
    "output_cache",
    "rotary_tables",
    "take_cache",
    "unsupported",
]

logger = logging.getLogger(__name__)

# The lowest and highest transformers releases the suite passed with (`.ci/run` tests both ends and
# the constraints file pins the newest). DummyLayer cache layers appeared in 5.23.
TESTED = ("5.23.0", "5.24.0")
_UPPER = "5.25"  # the first minor release not yet tested (the bound in pyproject.toml)
VERSION = transformers.__version__

# The names a cache may arrive under, newest first. 5.24 keeps `past_key_values` as a deprecated alias.
_CACHE_NAMES = ("cache", "past_key_values")
CACHE_KWARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# The mask builders' own name for it (renamed in the same release, but read from their signature).
_MASK_CACHE_KWARG = next(n for n in _CACHE_NAMES if n in inspect.signature(create_causal_mask).parameters)
# Qwen3-VL's text model receives DeepStack's visual features (one (N_visual, C) tensor per early layer)
# and the (B, T) mask of the positions they are added to under these names.
DEEPSTACK_MASK_KWARG = "visual_pos_masks"
DEEPSTACK_EMBEDS_KWARG = "deepstack_visual_embeds"


def unsupported(what: str) -> str:
    """A sentence naming the installed transformers and the tested range, for error messages."""
    import skipvlm

    return (
        f"{what}: transformers {VERSION} is not supported by skipvlm {skipvlm.__version__}; supported: "
        f"{TESTED[0]} to {TESTED[1]} (pip install 'transformers>={TESTED[0]},<{_UPPER}', or use the "
        "project's constraints.txt)"
    )


def check_version(version: str = VERSION) -> bool:
    """Warn once if ``version`` lies outside the tested range; return whether it lies inside."""
    inside = Version(TESTED[0]) <= Version(version) < Version(_UPPER)
    if not inside:
        warnings.warn(
            f"skipvlm was tested with transformers {TESTED[0]} to {TESTED[1]}, but {version} is installed; "
            "plans check at run time that the KV cache is used and raise if it is not. Install a tested "
            f"release with pip install 'transformers>={TESTED[0]},<{_UPPER}'",
            UserWarning,
            stacklevel=3,
        )
    return inside


def cache_kwargs(cache: Cache | None) -> dict[str, Cache | None]:
    """The keyword argument that passes ``cache`` to a stock attention module or model forward."""
    return {CACHE_KWARG: cache}


def take_cache(explicit: dict[str, Any], kwargs: dict[str, Any]) -> Cache | None:
    """Pop the cache a caller passed, under any name transformers has used, from ``kwargs``.

    Args:
        explicit: the named arguments the forward declared itself (name -> value), consulted first.
        kwargs: the remaining keyword arguments; the cache names are removed from it.

    Raises:
        ValueError: two different caches were passed under two names, or a cache keyword holds
            something that is not a cache.
    """
    found = {name: explicit.get(name) for name in _CACHE_NAMES}
    for name in _CACHE_NAMES:
        if name in kwargs:
            found[name] = kwargs.pop(name)
    given = {name: value for name, value in found.items() if value is not None}
    caches: list[Any] = []
    for value in given.values():  # distinct by identity (no id(): a compiled step would guard on it)
        if not any(value is seen for seen in caches):
            caches.append(value)
    if len(caches) > 1:
        raise ValueError(
            f"two different KV caches were passed ({' and '.join(given)}); pass one, as {CACHE_KWARG}="
        )
    cache = caches[0] if caches else None
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(
            f"the KV cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; "
            "legacy tuple caches are not supported"
        )
    return cache


def output_cache(output: Any) -> Cache | None:
    """The KV cache of a model output (``output.cache`` on 5.24+, ``output.past_key_values`` before)."""
    for name in _CACHE_NAMES:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def decoder_output(
    hidden: torch.Tensor,
    cache: Cache | None,
    hidden_states: tuple[torch.Tensor, ...] | None,
    attentions: tuple[torch.Tensor | None, ...] | None,
) -> BaseModelOutputWithPast:
    """The text model's output, with the cache in the field this transformers reads."""
    return BaseModelOutputWithPast(
        last_hidden_state=hidden,
        hidden_states=hidden_states,
        attentions=attentions,
        **{CACHE_KWARG: cache},
    )


def build_masks(
    config: Any,
    layer_types: list[str],
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The attention mask of each layer kind, built by the stock builders as the stock model builds them.

    ``token_type_ids`` (B, T) (1 on image tokens) gives Gemma 3's masks: image tokens attend
    bidirectionally within their image, ``OR(causal, block)`` on full layers and ``AND(sliding window,
    OR(causal, block))`` on sliding ones (what ``Gemma3Model`` hands its language model).

    Raises:
        ValueError: a text model with bidirectional attention (``use_bidirectional_attention``).
    """
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            "skipvlm runs causal decoders; this text model attends bidirectionally "
            "(use_bidirectional_attention=True), which skip plans do not support"
        )
    if token_type_ids is not None and bool((token_type_ids == 1).any()):
        try:
            from transformers.models.gemma3.modeling_gemma3 import (
                create_masks_for_vision_model,
                get_block_sequence_ids_for_mask,
            )
        except ImportError:  # the image-block mask builders of transformers 5.24
            raise ValueError(unsupported("Gemma 3's image-block masks cannot be built")) from None

        masks = create_masks_for_vision_model(
            config=config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            block_sequence_ids=get_block_sequence_ids_for_mask(token_type_ids, device=embeds.device),
            **{_MASK_CACHE_KWARG: cache},
        )
        return {kind: masks[kind] for kind in set(layer_types)}
    kwargs = {
        "config": config,
        "inputs_embeds": embeds,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        _MASK_CACHE_KWARG: cache,
    }
    masks: dict[str, Any] = {}
    for kind in set(layer_types):
        build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        masks[kind] = build(**kwargs)
    return masks


def rotary_tables(rotary_emb: torch.nn.Module, layer_types: tuple[str, ...] | None = None) -> Any:
    """``(hidden, position ids) -> (cos, sin)``; with ``layer_types`` (a model that keeps one table per
    layer type, Gemma 3), ``-> {layer type: (cos, sin)}`` computed as ``rotary_emb(x, ids, layer_type)``."""
    if layer_types is None:
        return rotary_emb
    kinds = sorted(set(layer_types))

    def tables(hidden: torch.Tensor, ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: rotary_emb(hidden, ids, kind) for kind in kinds}

    return tables


def compiling() -> bool:
    """True while ``torch.compile`` traces the code (python-side branches then become guards)."""
    return torch.compiler.is_compiling()


def layer_length(layer: Any) -> int:
    """Tokens a cache layer has seen (0 for a DummyLayer or an unfilled layer); a sliding-window layer
    counts every token it was given, not only those it still holds."""
    if isinstance(layer, DummyLayer) or not getattr(layer, "is_initialized", False):
        return 0
    return int(layer.get_seq_length())


def _typed_dict_keys(cls: Any) -> set[str]:
    try:
        return set(typing.get_type_hints(cls))
    except Exception:  # an annotation this Python cannot resolve: fall back to the raw names
        names: set[str] = set()
        for klass in getattr(cls, "__mro__", (cls,)):
            names |= set(getattr(klass, "__annotations__", {}))
        return names


def _passed_on_keywords() -> frozenset[str]:
    """The keywords a stock text model's forward accepts in ``**kwargs`` and hands to its layers."""
    from transformers.utils.generic import TransformersKwargs

    names = _typed_dict_keys(TransformersKwargs)
    try:
        from transformers.modeling_flash_attention_utils import FlashAttentionKwargs

        names |= _typed_dict_keys(FlashAttentionKwargs)
    except ImportError:  # pragma: no cover - present in every tested release
        pass
    # Named parameters of the stock attention forwards (e.g. Qwen2-VL's position_ids) pass on too.
    from transformers.models.llama.modeling_llama import LlamaAttention

    names |= set(inspect.signature(LlamaAttention.forward).parameters) - {"self", "kwargs"}
    return frozenset(names)


_PASSED_ON: frozenset[str] | None = None
# Keywords a generation model passes down to its text model but applies itself (the text model drops them).
_APPLIED_ABOVE = frozenset({"logits_to_keep"})


def check_forward_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse keywords a stock text model would not pass to its layers, and caches under unknown names.

    Raises:
        ValueError: naming the keyword and the installed transformers version.
    """
    global _PASSED_ON
    if _PASSED_ON is None:
        _PASSED_ON = _passed_on_keywords()
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise ValueError(
                unsupported(f"a KV cache arrived under the keyword {name!r}, which skipvlm does not consume")
            )
        # A keyword set to None carries nothing to drop (InternVL hands its unused `image_sizes=None` on);
        # LLaVA-OneVision hands on `logits_to_keep`, which the generation model applies itself.
        if name not in _PASSED_ON and value is not None and name not in _APPLIED_ABOVE:
            raise ValueError(
                unsupported(f"the text model's forward got the keyword {name!r}, which skipvlm does not know")
            )
