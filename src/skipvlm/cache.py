"""The KV cache under a plan: dynamic or static, with no storage for the attentions that do not run.

``shared/METHODS.md`` §1: a skipped attention holds no KV cache. Both of transformers' cache kinds work:

* ``DynamicCache`` (the default): layers grow with every token;
* ``StaticCache`` (``generate(..., cache_implementation="static")`` or one a user builds): each layer
  preallocates ``(B, H_kv, max_cache_len, D)`` keys and values on its first update, the layout
  ``torch.compile`` needs for a decode step with fixed shapes.

In either, the layer of every skipped attention is a :class:`~transformers.cache_utils.DummyLayer`, and
the kept layers are the stock layers of that cache kind. A static layer allocates lazily, so putting
the DummyLayers in before the prefill means a skipped attention never allocates anything: the static
cache of a plan that skips k of L attentions holds exactly ``(L - k) / L`` of the stock bytes,
``2 B H_kv max_cache_len D`` bytes-per-element for each kept layer.

A plan that withdraws visual tokens (VTW, FastV, DyVTE) stores fewer tokens in the layers after the
exit than before it, which a static layer (one fill level per cache) cannot hold; such plans refuse a
static cache with an error that names the fix.

A static layer keeps its fill level in a device tensor. Reading it is a device sync in eager mode and
a graph break under ``torch.compile``, so this module reads it only where it must: whether a forward is
a prefill (eager: the tensor; compiled: a compiled forward is a decoding step, the way transformers
compiles generation, and a cache that was never written is a prefill), and the check that the kept
attentions stored their keys (at prefill only).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from skipvlm import compat
from skipvlm.compat import Cache, DummyLayer, DynamicCache, StaticCache, StaticLayer

__all__ = [
    "cache_lengths",
    "check_cache_grew",
    "is_empty",
    "is_static",
    "kv_cache_bytes",
    "memory_of",
    "prepare_cache",
    "remember",
]

logger = logging.getLogger(__name__)


def is_static(cache: Cache | None) -> bool:
    """Whether ``cache`` holds static (preallocated) layers."""
    return cache is not None and any(isinstance(layer, StaticLayer) for layer in cache.layers)


def _first_attending(cache: Cache) -> Any:
    return next((layer for layer in cache.layers if not isinstance(layer, DummyLayer)), None)


def is_empty(cache: Cache | None) -> bool:
    """Whether a forward with ``cache`` starts from nothing (a prefill), read without a device sync or a
    graph break where possible (see the module docstring)."""
    if cache is None:
        return True
    layer = _first_attending(cache)
    if layer is None:
        return True
    if isinstance(layer, StaticLayer):
        if not layer.is_initialized:
            return True
        if compat.compiling():  # a compiled forward decodes; prefill runs eagerly, as generate runs it
            return False
        return int(layer.get_seq_length()) == 0
    return cache.get_seq_length() == 0


def _static_length(cache: Cache) -> int:
    """The ``max_cache_len`` a static cache was built with (its longest static layer)."""
    return max(layer.max_cache_len for layer in cache.layers if isinstance(layer, StaticLayer))


def prepare_cache(
    config: Any,
    cache: Cache | None,
    use_cache: bool | None,
    attends: list[bool],
    checkpointing: bool,
    exits_tokens: bool = False,
) -> Cache | None:
    """The cache a forward runs with: a DummyLayer in every layer whose attention does not run, the cache
    kind's stock layer in every other.

    Args:
        config: the text model's config.
        cache: the cache passed in (None: a new ``DynamicCache`` if caching is on).
        use_cache: the forward's ``use_cache`` (None: the config's, when any attention runs).
        attends: per layer, whether its attention runs under the plan.
        checkpointing: whether gradient checkpointing is on (no cache then).
        exits_tokens: whether the plan withdraws visual tokens (refuses a static cache).

    Raises:
        ValueError: every attention is skipped but a cache is asked for; a cache kind other than dynamic
            or static; a static cache under token exit; a filled cache whose layers follow another plan.
    """
    if use_cache is None:  # a model that attends nowhere has nothing to cache
        use_cache = bool(getattr(config, "use_cache", False)) and any(attends)
    if checkpointing and (use_cache or cache is not None):
        # Recomputing a layer in the backward pass would append to the cache twice.
        logger.warning("use_cache=True is incompatible with gradient checkpointing; running without a cache")
        return None
    if cache is None and not use_cache:
        return None
    if not any(attends):
        raise ValueError(
            f"the plan skips all {len(attends)} attentions, so there is nothing to cache; run with "
            "use_cache=False (e.g. model.generate(..., use_cache=False)) or keep at least one attention"
        )
    if cache is None:
        cache = DynamicCache(config=config)
    if not isinstance(cache, (DynamicCache, StaticCache)):
        raise ValueError(
            f"skipvlm plans run with a DynamicCache or a StaticCache, got {type(cache).__name__}; pass one "
            f"of those as {compat.CACHE_KWARG}=, or cache_implementation='static' / none to generate"
        )
    static = is_static(cache)
    if static and exits_tokens:
        raise ValueError(
            "plans that withdraw visual tokens (VTW, FastV, DyVTE) keep fewer tokens in the layers after the "
            "exit than before it, which a static cache cannot hold; drop cache_implementation='static' (or "
            "the StaticCache) to run this plan on the default DynamicCache, or drop the token exit"
        )
    layers = cache.layers
    if len(layers) < len(attends):  # a cache built without a config grows lazily; size it now
        layers.extend(DynamicCache(config=config).layers[len(layers) :])
    wrong = [i for i, runs in enumerate(attends) if runs == isinstance(layers[i], DummyLayer)]
    if not wrong:  # every decoding step after the prefill: nothing to read, nothing to change
        return cache
    if not is_empty(cache):
        i = wrong[0]
        raise ValueError(
            f"this KV cache was filled under another plan (layer {i}'s attention is "
            f"{'run' if attends[i] else 'skipped'} now); start a new cache after changing the plan"
        )
    if static:
        fresh = StaticCache(config=config, max_cache_len=_static_length(cache)).layers
    else:
        fresh = DynamicCache(config=config).layers
    for i in wrong:
        # A skipped layer's static tensors (if early-initialised) are dropped with the layer.
        layers[i] = fresh[i] if attends[i] else DummyLayer()
    return cache


def cache_lengths(cache: Cache | None, attends: list[bool], prefill: bool) -> dict[int, int] | None:
    """Tokens held now by the cache layer of every attention that runs; None where the check of
    :func:`check_cache_grew` is not made (no cache; a compiled forward; a static cache after its
    prefill, whose fill level is a device tensor)."""
    if cache is None or compat.compiling() or (is_static(cache) and not prefill):
        return None
    return {i: compat.layer_length(cache.layers[i]) for i, runs in enumerate(attends) if runs}


def check_cache_grew(cache: Cache | None, before: dict[int, int] | None) -> None:
    """Raise if an attention that ran did not store its keys and values in ``cache``.

    A transformers release that hands the attention modules the cache under a new name would otherwise
    decode from an empty cache and return wrong tokens without an error.
    """
    if cache is None or before is None:
        return
    stale = [i for i, n in before.items() if compat.layer_length(cache.layers[i]) <= n]
    if stale:
        raise RuntimeError(compat.unsupported(f"the KV cache was not used (layers {stale} stored nothing)"))


# The attribute of a cache that holds what its prefill left for decoding (a routes.Memory). It lives on the
# cache, not in a table of the model, so that a compiled decoding step reads it with no lookup to guard on.
_MEMORY = "_skipvlm_memory"


def memory_of(cache: Cache) -> Any:
    """What the prefill on ``cache`` left for decoding (a :class:`~skipvlm.routes.Memory`), or None."""
    return getattr(cache, _MEMORY, None)


def remember(cache: Cache, memory: Any) -> Any:
    """Keep ``memory`` with ``cache`` for its decoding steps; returns ``memory``."""
    setattr(cache, _MEMORY, memory)
    return memory


def kv_cache_bytes(cache: Cache | None) -> int:
    """Bytes held by the keys and values of a KV cache (0 for ``None``); for a static cache, the
    preallocated tensors, whatever their fill level."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
