"""The skip runtime: skipvlm's own layer loop around a stock Hugging Face text model.

``shared/METHODS.md`` §1. :func:`apply_plan` puts a :class:`SkipDecoder` where the model's text model
was and compiles the plan into one :class:`~skipvlm.routes.Route` per layer. The wrapper registers the
stock text model's children under their own names (so state-dict keys, weights and
``from_pretrained`` / ``save_pretrained`` are untouched), keeps the stock module to put back later, and
runs the loop the stock model runs, ``h = route(layer, h, step)``:

* a layer whose attention is skipped holds a :class:`~transformers.cache_utils.DummyLayer` in the KV
  cache, dynamic or static (it stores nothing; sequence length and positions are read from the layers
  that attend; :mod:`skipvlm.cache`);
* position ids, rotary tables and masks are built once per forward exactly as the stock text models
  build them (1-D RoPE, Qwen2-VL's / Qwen3-VL's 3-D M-RoPE, Gemma 3's one table per layer type and
  bidirectional image blocks), through :mod:`skipvlm.compat`;
* visual-token exit (§4) is a hook of the step: before a layer it may switch the step to a packed
  layout of the remaining tokens; everything that reads the layout (masks, positions, the tokens
  adapters pool over) follows.
* a host family may add a hook of its own (:attr:`~skipvlm.arch.HostFamily.forward_hook`), run after
  every layer's route on the current layout: Qwen3-VL's DeepStack adds its visual features there.

The runtime knows no method: adapters live in their routes, and a token-exit method is reached through
the plan (:meth:`~skipvlm.plan.Plan.token_exit`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from skipvlm import compat
from skipvlm.arch import ArchFacts, arch_facts, decoder_slot, encoder_host, unwrap
from skipvlm.cache import (
    cache_lengths,
    check_cache_grew,
    is_empty,
    kv_cache_bytes,
    memory_of,
    prepare_cache,
    remember,
)
from skipvlm.compat import Cache
from skipvlm.layout import gather_tokens
from skipvlm.plan import CONFIG_KEY, Plan
from skipvlm.routes import Frame, Memory, Route, RouteError, Step, plain_route, prompt_mask_of

__all__ = [
    "ExitHook",
    "RemovedAttention",
    "SkipDecoder",
    "StockWrapper",
    "TopInputs",
    "apply_plan",
    "current_plan",
    "exit_layers",
    "kv_cache_bytes",
    "use_plan",
]

logger = logging.getLogger(__name__)


class RemovedAttention(nn.Module):
    """Stands where a merged model's skipped attention was: it holds no weights and must never run."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"the attention of layer {self.layer} was removed when its adapter was merged; "
            "this model must run with that layer's attention skipped"
        )


class ExitHook(Protocol):
    """One forward's visual-token exit, as the layer loop sees it (built by the plan's method)."""

    exit_layers: list[int] | None  # per example, the first layer without its visual tokens (prefill)

    def before_layer(self, i: int, h: torch.Tensor, step: Step) -> torch.Tensor: ...

    def watch(self, i: int, layer: nn.Module) -> contextlib.AbstractContextManager: ...

    def expand(self, h: torch.Tensor) -> torch.Tensor: ...


class TopInputs:
    """What the top-level model was called with that its text model does not receive: the ``input_ids``
    (a LLaVA-style model hands its text model embeddings only; token exit finds the image tokens in
    them) and the tokens adapters pool over (set by :meth:`~skipvlm.eas.EASModel.forward`). For a family
    with image blocks (Gemma 3) also the 2-D ``attention_mask`` and the ``token_type_ids``: its top model
    hands the text model prepared masks, and the runtime builds its own (for token exit and pooling)."""

    def __init__(self) -> None:
        self.input_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.token_type_ids: torch.Tensor | None = None
        self.calling = False  # within a call of the top model
        self.prepared = False  # the top model was handed prepared (per layer type) masks
        self.pool_mask: torch.Tensor | None = None
        self.pool_repeats = False  # pool_mask holds one row per prompt of a generate call
        self.hooks: tuple = ()

    def watch(self, model: nn.Module, path: str) -> None:
        """Record the ``input_ids`` of every call of ``model`` whose text model is at ``path``;
        idempotent, undone by :meth:`unwatch`."""
        if self.hooks:
            return
        self.hooks = (
            model.register_forward_pre_hook(functools.partial(_remember_ids, path=path), with_kwargs=True),
            model.register_forward_hook(
                functools.partial(_forget_ids, path=path), with_kwargs=True, always_call=True
            ),
        )

    def unwatch(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks = ()

    @contextlib.contextmanager
    def pooling(self, mask: torch.Tensor | None, repeats: bool = False) -> Iterator[None]:
        """Within the block, adapters pool over ``mask`` (B, T) instead of the attention mask at prefill.

        Training passes the prompt mask derived from the labels here, so answers never leak into the
        pooled vector. ``repeats``: ``mask`` has one row per prompt of a ``generate`` call, which may
        repeat every prompt ``r`` times in a row (beams, ``num_return_sequences``): batch row ``b`` is
        prompt ``b // r``.
        """
        previous = self.pool_mask, self.pool_repeats
        self.pool_mask, self.pool_repeats = mask, repeats
        try:
            yield
        finally:
            self.pool_mask, self.pool_repeats = previous

    def top_mask(self, attention_mask: Any, embeds: torch.Tensor, image_blocks: bool) -> Any:
        """The 2-D mask the top model was called with, where it handed the text model prepared masks
        because images attend within their blocks (Gemma 3); the runtime rebuilds those masks itself."""
        if not (image_blocks and isinstance(attention_mask, dict)):
            return attention_mask
        top = self.attention_mask
        if not self.calling or self.prepared or (top is not None and top.shape[0] != embeds.shape[0]):
            # `prepared`: generate built the masks itself, for a static cache: they are the ones to use
            return attention_mask
        return top  # None: no padding (the stock model builds its masks from None too)

    def image_types(self, embeds: torch.Tensor, prefill: bool, image_blocks: bool) -> torch.Tensor | None:
        """(B, T) token types of the top call (1: image token) where images attend within their blocks
        (at prefill; the stock model drops them while decoding)."""
        types = self.token_type_ids
        if not image_blocks or types is None or not prefill:
            return None
        return types if tuple(types.shape) == tuple(embeds.shape[:2]) else None


class StockWrapper(nn.Module):
    """Stands where a stock module was, holding its children under their own names.

    State-dict keys, weights and ``from_pretrained`` / ``save_pretrained`` are untouched; attributes
    that are not the wrapper's own (``config``, ``get_input_embeddings``, ...) are read from the stock
    module, whose children are the very same objects. :meth:`unwrap` gives the stock module back.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in base.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        object.__setattr__(self, "_own", set())  # child names that are the wrapper's, not the stock's
        # Held outside the module tree (its children are registered above under their own names);
        # set last, since attribute look-ups fall back to it.
        object.__setattr__(self, "_base", base)
        self.train(base.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, name)

    @property
    def base(self) -> nn.Module:
        """The stock module this wrapper runs."""
        return self._base

    def get_decoder(self) -> nn.Module:
        return self

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)
        self.embed_tokens = value

    def unwrap(self) -> nn.Module:
        """Return the stock module, with its children and train/eval mode as this wrapper has them."""
        for name, child in self.named_children():
            if name not in self._own:
                setattr(self.base, name, child)
        self.base.train(self.training)
        return self.base


class SkipDecoder(StockWrapper):
    """Runs a stock text model's decoder layers under a :class:`~skipvlm.plan.Plan`.

    Built by :func:`apply_plan`; not usually constructed directly. ``routes[i]`` is what layer ``i``
    computes.

    Args:
        base: the stock text model (e.g. ``LlamaModel``), which owns ``embed_tokens``, ``layers``,
            ``norm`` and ``rotary_emb``.
        facts: the architecture facts of the full model.
        plan: the plan to execute.
    """

    def __init__(self, base: nn.Module, facts: ArchFacts, plan: Plan):
        super().__init__(base)
        object.__setattr__(self, "facts", facts)
        self.routes = nn.ModuleList([plain_route(Plan(), i) for i in range(facts.num_layers)])
        self._own.add("routes")
        object.__setattr__(self, "inputs", TopInputs())
        object.__setattr__(self, "last_exit_layers", None)
        self.plan = plan

    @property
    def plan(self) -> Plan:
        return self._plan

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_exit", None)  # closures of the token-exit method: rebuilt from the plan
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        plan = self.__dict__.get("_plan")
        runner = plan.token_exit.runner(plan, self.facts) if plan is not None and plan.exits_tokens else None
        object.__setattr__(self, "_exit", runner)

    @plan.setter
    def plan(self, plan: Plan) -> None:
        self._compile(plan, list(self.routes))

    def attach(self, adapters: dict[int, nn.Module], plan: Plan | None = None) -> None:
        """Give layer ``i`` the modules ``adapters[i]`` (whose ``route(plan, i)`` decides its route from
        now on; an empty dict takes every layer's away) and run ``plan`` (default: the current one)."""
        routes = [Route(i, adapters.get(i)) for i in range(self.facts.num_layers)]
        self._compile(self.plan if plan is None else plan, routes)

    def _compile(self, plan: Plan, routes: list[Route]) -> None:
        """Compile ``plan`` into one route per layer; nothing changes if any route refuses it."""
        plan.validate_for(self.facts.num_layers)
        removed = [i for i in self.removed_attention() if i not in plan.skip_attention]
        if removed:
            raise ValueError(
                f"layer(s) {removed} had their attention removed by a merge, so the plan must keep "
                "skipping them; reload the base model to run those attentions again"
            )
        exit_runner = None
        if plan.exits_tokens:
            if not self.facts.is_multimodal:
                raise ValueError(
                    f"a {self.facts.model_type} model has no visual tokens; visual-token exit (VTW, FastV, "
                    "DyVTE) needs a multimodal model such as LLaVA or Qwen2-VL"
                )
            exit_runner = plan.token_exit.runner(plan, self.facts)
        compiled, refused = [], []
        for route in routes:
            try:
                compiled.append(route.retarget(plan))
            except RouteError as err:
                refused.append(err)
        if refused:
            first = refused[0]
            layers = [e.layer for e in refused if (e.problem, e.fix) == (first.problem, first.fix)]
            raise ValueError(f"layer(s) {layers} {first.problem}; {first.fix}")
        for i, route in enumerate(compiled):
            self.routes[i] = route
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_exit", exit_runner)

    def owns_modules(self) -> bool:
        """True when a route holds modules of its own (adapters, a per-example merge)."""
        return any(next(route.children(), None) is not None for route in self.routes)

    def removed_attention(self) -> list[int]:
        """Layers whose attention weights were freed by a merge (see :class:`RemovedAttention`)."""
        name = self.facts.parts.attention
        return [
            i for i, layer in enumerate(self.layers) if isinstance(getattr(layer, name), RemovedAttention)
        ]

    def unwrap(self) -> nn.Module:
        """Return the stock text model (see :meth:`StockWrapper.unwrap`), removing the input hooks."""
        if self.removed_attention():
            raise ValueError(
                f"layer(s) {self.removed_attention()} had their attention removed by a merge, so this "
                "model cannot run as the stock model; keep its plan, or reload the base model"
            )
        self.inputs.unwatch()
        return super().unwrap()

    # --- the forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Same contract as the stock text model's ``forward``; executes the plan.

        The KV cache may come as ``cache`` (transformers 5.24+) or ``past_key_values`` (before). Keywords
        the stock model would hand to its layers go to the attention modules; any other keyword, or a
        cache under a name skipvlm does not consume, raises instead of being dropped.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        kwargs.pop("return_dict", None)
        cache = compat.take_cache({"cache": cache, "past_key_values": past_key_values}, kwargs)
        family_hook = self.facts.family.forward_hook
        extra = family_hook(kwargs) if family_hook is not None else None  # e.g. Qwen3-VL's DeepStack
        compat.check_forward_kwargs(kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        checkpointing = self.training and self._checkpointing_enabled()
        attends = [route.runs_attention for route in self.routes]
        exits = self._exit is not None
        cache = prepare_cache(self.config, cache, use_cache, attends, checkpointing, exits)
        attention_mask = self.inputs.top_mask(attention_mask, inputs_embeds, self.facts.family.image_blocks)
        step = self._step(
            inputs_embeds, attention_mask, position_ids, cache, kwargs, output_attentions, attends
        )
        ids = input_ids if input_ids is not None else self.inputs.input_ids
        hook = self._exit.begin(step, ids, attention_mask) if self._exit is not None else None
        lengths = cache_lengths(cache, attends, step.prefill)

        full = hook.expand if hook is not None else (lambda x: x)  # every original position
        h = inputs_embeds
        hidden = [h] if output_hidden_states or self.config.output_hidden_states else None
        for i, (layer, route) in enumerate(zip(self.layers, self.routes, strict=True)):
            if hook is not None:
                h = hook.before_layer(i, h, step)
            with hook.watch(i, layer) if hook is not None else contextlib.nullcontext():
                if checkpointing:
                    h = torch.utils.checkpoint.checkpoint(route, layer, h, step, use_reentrant=False)
                else:
                    h = route(layer, h, step)
            if hidden is not None and i < len(self.layers) - 1:  # layer outputs, as stock records them
                hidden.append(full(h))
            if extra is not None:
                h = extra.after_layer(i, h, step.frame.index, step.frame.mask)
        check_cache_grew(cache, lengths)
        if step.prefill:
            object.__setattr__(self, "last_exit_layers", hook.exit_layers if hook is not None else None)
        h = self.norm(full(h))
        hidden = (*hidden, h) if hidden is not None else None
        attentions = tuple(step.attentions) if step.attentions is not None else None
        return compat.decoder_output(h, cache, hidden, attentions)

    # --- the step ------------------------------------------------------------------------------------

    def _checkpointing_enabled(self) -> bool:
        # transformers' gradient_checkpointing_enable() flags the decoder layers (and this module).
        return bool(self.__dict__.get("gradient_checkpointing")) or any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.layers
        )

    def _step(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        kwargs: dict[str, Any],
        output_attentions: bool | None,
        attends: list[bool],
    ) -> Step:
        """The forward's positions, rotary tables, lazy masks and memory, as the stock model builds them."""
        prefill = is_empty(cache)
        memory = _memory(self, cache, prefill, self._exit is not None)
        rope_ids, text_ids = _positions(self.facts.rope, position_ids, embeds, cache)
        config, types = self.config, self.facts.layer_types
        image_types = self.inputs.image_types(embeds, prefill, self.facts.family.image_blocks)
        masks = functools.partial(_masks, config, types, attention_mask, embeds, cache, text_ids, image_types)
        per_type = types if self.facts.family.rotary_per_layer_type else None
        rotary = compat.rotary_tables(self.rotary_emb, per_type)
        step = Step(
            shape=tuple(embeds.shape[:2]),
            cache=cache,
            prefill=prefill,
            frame=Frame(None, None, text_ids, rope_ids, rotary(embeds, rope_ids), masks),
            layer_types=self.facts.layer_types,
            attention_kwargs=kwargs,
            memory=memory,
            prompt_mask=functools.partial(
                prompt_mask_of, self.inputs.pool_mask, attention_mask, embeds, self.inputs.pool_repeats
            ),
            attends=tuple(attends),
            build_masks=lambda mask, hidden, view: _masks(
                config, types, mask, hidden, view, None, _in_layout(image_types, step.frame)
            ),
            rotary=rotary,
            attentions=[] if output_attentions else None,
            parts=self.facts.parts,
        )
        return step


# --- helpers of the forward --------------------------------------------------------------------------


def _memory(owner: nn.Module, cache: Cache | None, prefill: bool, exits: bool) -> Memory:
    """The memory of ``cache``: a new one at prefill (or without a cache), the prefill's while decoding (an
    empty one for a cache filled by another model or without a plan). It lives on the cache
    (:func:`~skipvlm.cache.memory_of`), so a compiled decoding step reads it without a model-wide table."""
    if cache is None:
        return Memory(owner=id(owner))
    memory = None if prefill else memory_of(cache)
    if memory is None or memory.owner != id(owner):
        memory = remember(cache, Memory(owner=id(owner)))
    if not exits and memory.token_exit is not None:
        raise ValueError(
            "this KV cache was filled under a plan that withdrew visual tokens; start a new cache after "
            "changing the plan"
        )
    return memory


def _masks(
    config: Any,
    layer_types: tuple[str, ...],
    attention_mask: torch.Tensor | dict | None,
    embeds: torch.Tensor,
    cache: Cache | None,
    text_ids: torch.Tensor | None,
    image_types: torch.Tensor | None = None,
) -> dict[str, Any]:
    if isinstance(attention_mask, dict):  # already prepared per layer type, e.g. by `generate`
        return attention_mask
    return compat.build_masks(config, layer_types, embeds, attention_mask, cache, text_ids, image_types)


def _in_layout(values: torch.Tensor | None, frame: Frame) -> torch.Tensor | None:
    """(B, T) per-position values read in ``frame``'s packed layout (0 in padding slots)."""
    if values is None or frame.index is None:
        return values
    return torch.where(frame.mask, gather_tokens(values, frame.index), 0)


def _positions(
    rope: str, position_ids: torch.Tensor | None, embeds: torch.Tensor, cache: Cache | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rotary position ids, text position ids for masks and layers), as the stock model builds them."""
    batch, length = embeds.shape[:2]
    mrope = rope.startswith("mrope")
    rows = 4 if rope == "mrope_text" else 3  # Qwen3-VL keeps 1-D ids as the text ids too
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = torch.arange(length, device=embeds.device) + past
        position_ids = position_ids.view(1, 1, -1).expand(rows, batch, -1) if mrope else position_ids[None]
    if not mrope:
        return position_ids, position_ids
    # M-RoPE: (3, B, T) temporal/height/width ids, optionally preceded by text ids as (4, B, T).
    if position_ids.ndim == 2:
        position_ids = position_ids[None].expand(rows, position_ids.shape[0], -1)
    if position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    return position_ids, None


def _remember_ids(model: nn.Module, args: tuple, kwargs: dict, path: str) -> None:
    inputs = model.get_submodule(path).inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    inputs.input_ids = ids if isinstance(ids, torch.Tensor) else None
    mask, types = kwargs.get("attention_mask"), kwargs.get("token_type_ids")
    inputs.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
    inputs.prepared = isinstance(mask, dict)
    inputs.token_type_ids = types if isinstance(types, torch.Tensor) else None
    inputs.calling = True


def _forget_ids(model: nn.Module, args: tuple, kwargs: dict, output: Any, path: str) -> None:
    inputs = model.get_submodule(path).inputs
    inputs.input_ids = inputs.attention_mask = inputs.token_type_ids = None
    inputs.calling = inputs.prepared = False


# --- public functions ----------------------------------------------------------------------------------


def exit_layers(model: nn.Module) -> list[int] | None:
    """Per example of the last prefill, the first decoder layer that ran without (some of) its visual
    tokens; the number of layers for an example that kept them all. None if the plan withdraws none."""
    decoder = decoder_slot(model, arch_facts(model))[2]  # an EASModel resolves through its base model
    return decoder.last_exit_layers if isinstance(decoder, SkipDecoder) else None


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make ``model`` execute ``plan``, in place; the one way a plan is set (an EAS model's
    ``set_plan`` calls it too).

    Applying an empty ``Plan()`` puts the stock text model back (unless a route holds adapters), so
    the model runs exactly as it was loaded. Weights are never changed or freed by this call. The plan
    is also written to the model's config (``skipvlm_plan``), so ``save_pretrained`` carries it and
    :func:`skipvlm.load_pretrained` restores it.

    Args:
        model: a supported transformers model (see :data:`skipvlm.arch.SUPPORTED_MODEL_TYPES`), a
            wrapper of one with ``get_base_model()`` such as a PEFT ``PeftModel``, or an EAS model.
        plan: the plan to execute.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``plan`` is not a :class:`Plan`.
        ValueError: the plan names layers the model does not have, or needs an adapter it lacks.
        UnsupportedModelError: the architecture is not supported.
    """
    if not isinstance(plan, Plan):
        raise TypeError(
            f"apply_plan needs a skipvlm.Plan, got {type(plan).__name__}; "
            "build one with skipvlm.Plan(skip_attention=[...], skip_mlp=[...])"
        )
    encoder = encoder_host(model)
    if encoder is not None:  # a two-stream encoder host (METHODS §7) runs plans of its own
        return encoder.apply_plan(model, plan)
    target = unwrap(model)  # hooks and the config belong to the transformers model, not its wrapper
    facts = arch_facts(target)
    plan.validate_for(facts.num_layers)
    parent, name, decoder = decoder_slot(target, facts)
    if isinstance(decoder, SkipDecoder):
        if plan.is_empty and not decoder.owns_modules():
            setattr(parent, name, decoder.unwrap())
        else:
            decoder.plan = plan
    elif not plan.is_empty:
        decoder = SkipDecoder(decoder, facts, plan)
        setattr(parent, name, decoder)
    if isinstance(getattr(parent, name), SkipDecoder) and facts.is_multimodal:
        decoder.inputs.watch(target, facts.decoder_path)
    if plan.is_empty:
        if hasattr(target.config, CONFIG_KEY):
            delattr(target.config, CONFIG_KEY)
    else:
        setattr(target.config, CONFIG_KEY, plan.to_dict())
    logger.debug("applied %s to %s", plan, type(model).__name__)
    return model


def current_plan(model: nn.Module) -> Plan:
    """The plan ``model`` executes now (an empty plan for a stock model); ``model`` may be wrapped, e.g.
    a PEFT ``PeftModel``."""
    encoder = encoder_host(model)
    if encoder is not None:
        return encoder.current_plan(model)
    decoder = decoder_slot(model, arch_facts(model))[2]
    return decoder.plan if isinstance(decoder, SkipDecoder) else Plan()


@contextlib.contextmanager
def use_plan(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """Run ``model`` (a transformers model, an :class:`~skipvlm.EASModel` or a PEFT ``PeftModel``) under
    ``plan`` in the block, then put its previous plan back."""
    previous = current_plan(model)
    apply_plan(model, plan)
    try:
        yield model
    finally:
        apply_plan(model, previous)
