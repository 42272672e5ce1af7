"""The skip runtime: skipvlm's own layer loop around a stock Hugging Face text model.

``shared/METHODS.md`` §1. :func:`apply_plan` puts a :class:`SkipDecoder` where the model's text model
was. The wrapper registers the stock text model's children under their own names (so state-dict keys,
weights and ``from_pretrained`` / ``save_pretrained`` are untouched), keeps the stock module to put back
later, and runs the decoder layers itself, calling the stock norms, attention and MLP. That loop is
the one place that decides, per layer, what executes:

* a skipped attention runs no q/k/v/o projection and no attention kernel, and its layer holds a
  :class:`~transformers.cache_utils.DummyLayer` in the KV cache (so it stores nothing, and sequence
  length / positions are read from the first layer that does attend, layer 0 skipped or not);
* a skipped MLP runs nothing.

Position ids, rotary tables and masks are built once per forward exactly as the stock text models
build them (1-D RoPE for Llama / Mistral / Qwen2, 3-D M-RoPE for Qwen2-VL / Qwen2.5-VL).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.cache_utils import Cache, DummyLayer, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from skipvlm.arch import ArchFacts, arch_facts, decoder_slot
from skipvlm.plan import Plan

__all__ = ["SkipDecoder", "apply_plan", "current_plan", "kv_cache_bytes"]

logger = logging.getLogger(__name__)


class SkipDecoder(nn.Module):
    """Runs a stock text model's decoder layers under a :class:`~skipvlm.plan.Plan`.

    Built by :func:`apply_plan`; not usually constructed directly. Attributes that are not its own
    (``config``, ``get_input_embeddings``, ...) are read from the wrapped stock module, whose children
    are the very same objects.

    Args:
        base: the stock text model (e.g. ``LlamaModel``), which owns ``embed_tokens``, ``layers``,
            ``norm`` and ``rotary_emb``.
        facts: the architecture facts of the full model.
        plan: the plan to execute.
    """

    def __init__(self, base: nn.Module, facts: ArchFacts, plan: Plan):
        super().__init__()
        object.__setattr__(self, "facts", facts)
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in base.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        # Held outside the module tree (its children are registered above under their own names);
        # set last, since attribute look-ups fall back to it.
        object.__setattr__(self, "_base", base)
        self.train(base.training)
        self.plan = plan

    # --- plumbing ------------------------------------------------------------------------------

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
        """The stock text model this wrapper runs."""
        return self._base

    @property
    def plan(self) -> Plan:
        return self._plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        plan.validate_for(self.facts.num_layers)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_skip_attn", frozenset(plan.skip_attention))
        object.__setattr__(self, "_skip_mlp", frozenset(plan.skip_mlp))

    def get_decoder(self) -> nn.Module:
        return self

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)
        self.embed_tokens = value

    def unwrap(self) -> nn.Module:
        """Return the stock module, with its children and train/eval mode as this wrapper has them."""
        for name, child in self.named_children():
            setattr(self.base, name, child)
        self.base.train(self.training)
        return self.base

    # --- cache ---------------------------------------------------------------------------------

    def _prepare_cache(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        """Return the cache to use, with a DummyLayer in every layer whose attention is skipped."""
        if cache is None and not use_cache:
            return None
        num_layers = self.facts.num_layers
        if len(self._skip_attn) == num_layers:
            raise ValueError(
                f"the plan skips all {num_layers} attentions, so there is nothing to cache; run with "
                "use_cache=False (e.g. model.generate(..., use_cache=False)) or keep at least one attention"
            )
        if cache is None:
            cache = DynamicCache(config=self.config)
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"skipvlm plans run with a DynamicCache, got {type(cache).__name__}; drop the "
                "cache_implementation / past_key_values argument to use the default cache"
            )
        layers = cache.layers
        if len(layers) < num_layers:  # a cache built without a config grows lazily; size it now
            template = DynamicCache(config=self.config).layers
            layers.extend(template[len(layers) :])
        filled = cache.get_seq_length() > 0
        for i in range(num_layers):
            skipped = i in self._skip_attn
            if skipped == isinstance(layers[i], DummyLayer):
                continue
            if filled:
                raise ValueError(
                    f"this KV cache was filled under another plan (layer {i}'s attention is "
                    f"{'skipped' if skipped else 'run'} now); start a new cache after changing the plan"
                )
            layers[i] = DummyLayer() if skipped else DynamicCache(config=self.config).layers[i]
        return cache

    # --- positions and masks -------------------------------------------------------------------

    def _positions(
        self, position_ids: torch.Tensor | None, embeds: torch.Tensor, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (rotary position ids, text position ids for masks and layers) like the stock model."""
        batch, length = embeds.shape[:2]
        mrope = self.facts.rope == "mrope"
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(length, device=embeds.device) + past
            position_ids = position_ids.view(1, 1, -1).expand(3, batch, -1) if mrope else position_ids[None]
        if not mrope:
            return position_ids, position_ids
        # M-RoPE: (3, B, T) temporal/height/width ids, optionally preceded by text ids as (4, B, T).
        if position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, position_ids.shape[0], -1)
        if position_ids.shape[0] == 4:
            return position_ids[1:], position_ids[0]
        return position_ids, None

    def _masks(
        self,
        attention_mask: torch.Tensor | dict | None,
        embeds: torch.Tensor,
        cache: Cache | None,
        text_position_ids: torch.Tensor | None,
    ) -> dict[str, Any]:
        if isinstance(attention_mask, dict):  # already prepared per layer type, e.g. by `generate`
            return attention_mask
        kwargs = {
            "config": self.config,
            "inputs_embeds": embeds,
            "attention_mask": attention_mask,
            "past_key_values": cache,
            "position_ids": text_position_ids,
        }
        masks: dict[str, Any] = {}
        for kind in set(self.facts.layer_types):
            build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            masks[kind] = build(**kwargs)
        return masks

    # --- the layer loop --------------------------------------------------------------------------

    def _checkpointing_enabled(self) -> bool:
        # transformers' gradient_checkpointing_enable() flags the decoder layers (and this module).
        return bool(self.__dict__.get("gradient_checkpointing")) or any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.layers
        )

    def _layer(
        self,
        i: int,
        layer: nn.Module,
        mask: Any,
        text_ids: torch.Tensor | None,
        cache: Cache | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        kwargs: dict[str, Any],
        hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer under the plan: ``a = h + Attn(N_in(h))``, ``out = a + MLP(N_post(a))``."""
        weights = None
        if i not in self._skip_attn:
            attn_out, weights = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden),
                attention_mask=mask,
                position_ids=text_ids,
                past_key_values=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden = hidden + attn_out
        if i not in self._skip_mlp:
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, weights

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
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        """Same contract as the stock text model's ``forward``; executes the plan."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        kwargs.pop("return_dict", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache is None:
            # A model that attends nowhere has nothing to cache; only an explicit request is an error.
            runs_any = len(self._skip_attn) < self.facts.num_layers
            use_cache = bool(getattr(self.config, "use_cache", False)) and runs_any
        checkpointing = self.training and self._checkpointing_enabled()
        if checkpointing and use_cache:
            # Recomputing a layer in the backward pass would append to the cache twice.
            logger.warning(
                "use_cache=True is incompatible with gradient checkpointing; running without a cache"
            )
            use_cache, past_key_values = False, None
        cache = self._prepare_cache(past_key_values, use_cache)

        rope_ids, text_ids = self._positions(position_ids, inputs_embeds, cache)
        masks = self._masks(attention_mask, inputs_embeds, cache, text_ids)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, rope_ids)

        layer_types = self.facts.layer_types
        want_hidden = output_hidden_states or getattr(self.config, "output_hidden_states", False)
        all_hidden: list[torch.Tensor] | None = [] if want_hidden else None
        all_attn: list[torch.Tensor | None] | None = [] if output_attentions else None
        for i, layer in enumerate(self.layers[: self.facts.num_layers]):
            if all_hidden is not None:
                all_hidden.append(hidden)
            run = functools.partial(
                self._layer, i, layer, masks[layer_types[i]], text_ids, cache, position_embeddings, kwargs
            )
            if checkpointing:
                hidden, weights = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)
            else:
                hidden, weights = run(hidden)
            if all_attn is not None and i not in self._skip_attn:
                all_attn.append(weights)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attn) if all_attn is not None else None,
        )


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make ``model`` execute ``plan``, in place.

    Applying an empty ``Plan()`` puts the stock text model back, so the model runs exactly as it was
    loaded. Weights are never changed or freed by this call.

    Args:
        model: a supported transformers model (see :data:`skipvlm.arch.SUPPORTED_MODEL_TYPES`).
        plan: the plan to execute.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``plan`` is not a :class:`Plan`.
        ValueError: the plan names layers the model does not have.
        UnsupportedModelError: the architecture is not supported.
    """
    if not isinstance(plan, Plan):
        raise TypeError(
            f"apply_plan needs a skipvlm.Plan, got {type(plan).__name__}; "
            "build one with skipvlm.Plan(skip_attention=[...], skip_mlp=[...])"
        )
    facts = arch_facts(model)
    plan.validate_for(facts.num_layers)
    parent, name, decoder = decoder_slot(model, facts)
    if isinstance(decoder, SkipDecoder):
        if plan.is_empty:
            setattr(parent, name, decoder.unwrap())
        else:
            decoder.plan = plan
    elif not plan.is_empty:
        setattr(parent, name, SkipDecoder(decoder, facts, plan))
    logger.debug("applied %s to %s", plan, type(model).__name__)
    return model


def current_plan(model: nn.Module) -> Plan:
    """The plan ``model`` executes now (an empty plan for a stock model)."""
    decoder = decoder_slot(model, arch_facts(model))[2]
    return decoder.plan if isinstance(decoder, SkipDecoder) else Plan()


def kv_cache_bytes(cache: Cache | None) -> int:
    """Bytes held by the keys and values of a KV cache (0 for ``None``)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
