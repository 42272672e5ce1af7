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

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from skipvlm import compat
from skipvlm.arch import ArchFacts, arch_facts, decoder_slot, unwrap
from skipvlm.compat import Cache, DummyLayer, DynamicCache
from skipvlm.pia import PIALayers, pooled_prompt
from skipvlm.plan import CONFIG_KEY, Plan
from skipvlm.tokens.exit import Frame, TokenExit, clear_exit_state, exit_state
from skipvlm.tokens.layout import gather_tokens

__all__ = [
    "RemovedAttention",
    "SkipDecoder",
    "apply_plan",
    "current_plan",
    "exit_layers",
    "kv_cache_bytes",
    "use_plan",
]

logger = logging.getLogger(__name__)

# Child names of a SkipDecoder that are skipvlm's own, not the stock text model's.
ADAPTERS = "pia_adapters"  # a PIALayers: adapters that run as branches (trainable)
MERGER = "pia_merger"  # a per-example merger: rewrites layer weights at each prefill, runs no branch
_CACHE_STATE = "skipvlm_router_state"  # attribute of a DynamicCache: the router state frozen at prefill
_INPUT_IDS = "_skipvlm_input_ids"  # SkipDecoder attribute: input_ids of the running top-level forward
_INPUT_HOOKS = "_skipvlm_input_hooks"  # SkipDecoder attribute: the hooks that set it


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


@dataclass
class _Prompt:
    """Per-forward pooling context of the adapters: the prompt mask at prefill, the frozen router state."""

    mask: torch.Tensor | None  # (B, T) bool at prefill, None while decoding
    state: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


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
        removed = [i for i in self.removed_attention() if i not in plan.skip_attention]
        if removed:
            raise ValueError(
                f"layer(s) {removed} had their attention removed by a merge, so the plan must keep "
                "skipping them; reload the base model to run those attentions again"
            )
        routers = None
        if plan.exits_tokens:
            if not self.facts.is_multimodal:
                raise ValueError(
                    f"a {self.facts.model_type} model has no visual tokens; visual-token exit (VTW, FastV, "
                    "DyVTE) needs a multimodal model such as LLaVA or Qwen2-VL"
                )
            if plan.dyvte is not None:
                routers = self._load_routers(plan)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_skip_attn", frozenset(plan.skip_attention))
        object.__setattr__(self, "_skip_mlp", frozenset(plan.skip_mlp))
        object.__setattr__(self, "_routers", routers)

    def _load_routers(self, plan: Plan) -> Any:
        from skipvlm.tokens.dyvte import WEIGHTS_NAME, DyVTERouters

        loaded = self.__dict__.setdefault("_router_cache", {})
        weights = Path(plan.dyvte) / WEIGHTS_NAME
        key = (plan.dyvte, weights.stat().st_mtime_ns if weights.is_file() else None)  # re-read if re-saved
        if key not in loaded:
            routers = DyVTERouters.load(plan.dyvte)
            routers.check_model(self.facts)
            loaded[key] = routers
        routers = loaded[key]
        attends = [i for i in range(self.facts.num_layers) if i not in plan.skip_attention]
        if not attends or attends[0] >= routers.layers[0]:
            raise ValueError(
                f"the DyVTE routers may exit at layer {routers.layers[0]}, but no attention runs before it "
                "under this plan; keep an earlier attention or train routers for later layers"
            )
        return routers

    def watch_inputs(self, model: nn.Module) -> None:
        """Let this decoder see the ``input_ids`` given to ``model`` (the top-level model that holds it).

        A LLaVA-style model hands its text model embeddings only; visual-token exit needs the ids to find
        the image tokens. Idempotent; :meth:`unwrap` removes the hooks.
        """
        if self.__dict__.get(_INPUT_HOOKS) or not self.facts.is_multimodal:
            return
        path = self.facts.decoder_path
        hooks = (
            model.register_forward_pre_hook(functools.partial(_remember_ids, path=path), with_kwargs=True),
            model.register_forward_hook(
                functools.partial(_forget_ids, path=path), with_kwargs=True, always_call=True
            ),
        )
        object.__setattr__(self, _INPUT_HOOKS, hooks)

    @property
    def last_exit_layers(self) -> list[int] | None:
        """Per example of the last prefill, the first layer that ran without its visual tokens (the
        number of layers where none left); None when the plan withdraws no tokens."""
        return self.__dict__.get("_last_exit_layers")

    def removed_attention(self) -> list[int]:
        """Layers whose attention weights were freed by a merge (see :class:`RemovedAttention`)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer.self_attn, RemovedAttention)]

    @contextlib.contextmanager
    def pooling_mask(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Within the block, adapters pool over ``mask`` (B, T) instead of the attention mask at prefill.

        Training passes the prompt mask derived from the labels here, so answers never leak into the
        pooled vector.
        """
        previous = self.__dict__.get("_pooling_mask")
        object.__setattr__(self, "_pooling_mask", mask)
        try:
            yield
        finally:
            object.__setattr__(self, "_pooling_mask", previous)

    def get_decoder(self) -> nn.Module:
        return self

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)
        self.embed_tokens = value

    def unwrap(self) -> nn.Module:
        """Return the stock module, with its children and train/eval mode as this wrapper has them."""
        if self.removed_attention():
            raise ValueError(
                f"layer(s) {self.removed_attention()} had their attention removed by a merge, so this "
                "model cannot run as the stock model; keep its plan, or reload the base model"
            )
        for handle in self.__dict__.pop(_INPUT_HOOKS, None) or ():
            handle.remove()
        for name, child in self.named_children():
            if name not in (ADAPTERS, MERGER):
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
                f"cache_implementation / {compat.CACHE_KWARG} argument to use the default cache"
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
        return compat.build_masks(
            self.config, self.facts.layer_types, embeds, attention_mask, cache, text_position_ids
        )

    def _prompt(
        self, attention_mask: torch.Tensor | dict | None, embeds: torch.Tensor, cache: Cache | None
    ) -> _Prompt:
        """Which tokens the adapters pool over in this forward, and where their router state lives.

        At prefill (no cache, or an empty one) the adapters pool over the prompt: the mask given to
        :meth:`pooling_mask`, else the non-padding tokens of the 2-D attention mask. The router state
        computed then is kept on the cache and reused, frozen, for every decoded token.
        """
        state = cache.__dict__.setdefault(_CACHE_STATE, {}) if cache is not None else {}
        if cache is not None and cache.get_seq_length() > 0:
            if not state and ADAPTERS in self._modules:
                raise ValueError(
                    "this KV cache was filled without skipvlm adapters, so there is no prompt state to "
                    "decode with; start generation from the prompt with this model"
                )
            return _Prompt(mask=None, state=state)
        state.clear()
        batch, length = embeds.shape[:2]
        mask = self.__dict__.get("_pooling_mask")
        if mask is None:
            if attention_mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
            elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
                mask = attention_mask.bool()
            else:
                raise ValueError(
                    "PIA adapters pool over the prompt's non-padding tokens and need the 2-D (batch, "
                    "length) attention_mask to find them; pass that instead of a prepared mask"
                )
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"the pooling mask has shape {tuple(mask.shape)} but the input is (batch={batch}, "
                f"length={length}); it must mark the prompt tokens of every row"
            )
        return _Prompt(mask=mask.to(embeds.device, torch.bool), state=state)

    # --- visual-token exit ---------------------------------------------------------------------

    def _policy(self) -> Any:
        plan = self._plan
        if plan.visual_exit_layer is not None:
            from skipvlm.tokens.vtw import VTW

            return VTW(plan.visual_exit_layer)
        if plan.fastv_layer is not None:
            from skipvlm.tokens.fastv import FastV

            return FastV(plan.fastv_layer, plan.fastv_ratio, plan.fastv_source, self.facts)
        from skipvlm.tokens.dyvte import DyVTE

        reference = self.embed_tokens.weight
        return DyVTE(self._routers.to(reference.device), plan.dyvte_threshold)

    def _token_exit(
        self,
        frame: Frame,
        cache: Cache | None,
        ids: torch.Tensor | None,
        attention_mask: torch.Tensor | dict | None,
        embeds: torch.Tensor,
    ) -> TokenExit | None:
        """The token exit of this forward, or None when the plan withdraws no visual token."""
        state = exit_state(cache)
        decoding = cache is not None and cache.get_seq_length() > 0
        if not self._plan.exits_tokens:
            if decoding and state is not None:
                raise ValueError(
                    "this KV cache was filled under a plan that withdrew visual tokens; start a new cache "
                    "after changing the plan"
                )
            clear_exit_state(cache)
            object.__setattr__(self, "_last_exit_layers", None)
            return None
        if isinstance(attention_mask, dict):
            raise ValueError(
                "visual-token exit builds its own masks from the 2-D (batch, length) attention_mask; pass "
                "that instead of prepared masks"
            )
        common = dict(
            frame=frame,
            num_layers=self.facts.num_layers,
            attends=[i not in self._skip_attn for i in range(self.facts.num_layers)],
            cache=cache,
            attention_mask=attention_mask,
            masks=lambda mask, hidden, view: self._masks(mask, hidden, view, None),
            rotary=self.rotary_emb,
        )
        if decoding:
            if state is None:
                raise ValueError(
                    "this KV cache was filled without visual-token exit; start a new cache after changing "
                    "the plan"
                )
            return TokenExit(policy=None, visual=None, **common) if state.segments else None
        if ids is None or tuple(ids.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                "visual-token exit finds the image tokens from input_ids; call the model with input_ids "
                "(not inputs_embeds), or apply the plan with skipvlm.apply_plan on the full model"
            )
        visual = ids == self.facts.image_token_id
        if self.facts.video_token_id is not None:
            visual |= ids == self.facts.video_token_id
        return TokenExit(policy=self._policy(), visual=visual.to(embeds.device), **common)

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
        prompt: _Prompt | None,
        hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decoder layer under the plan: ``a = h + Attn(N_in(h))``, ``out = a + MLP(N_post(a))``.

        With adapters, a skipped attention whose layer has a replace-PIA gives
        ``out = h + MLP(gamma_post * PIA(N_in(h)))`` (no second rms), a kept attention reads
        ``PIA(N_in(h))`` from its adapt-PIA (``shared/METHODS.md`` §2), and a layer skipped whole with a
        DAS bottleneck adapter gives ``out = h + A(N_in(h))`` (§3).
        """
        skipped = i in self._skip_attn
        weights = None
        x = None
        if prompt is not None:
            adapters: PIALayers | None = self._modules.get(ADAPTERS)
            merger = self._modules.get(MERGER)
            if skipped and i in self._skip_mlp:  # the whole layer: DAS's h + A(N_in(h)), or nothing
                bottleneck = adapters.bottleneck._modules.get(str(i)) if adapters is not None else None
                if bottleneck is not None:
                    hidden = hidden + bottleneck(layer.input_layernorm(hidden))
                return hidden, None
            if merger is not None and merger.covers(i):
                if prompt.mask is not None:  # prefill: fold this example's adapter into the weights
                    merger.merge_layer(i, layer, pooled_prompt(layer.input_layernorm(hidden), prompt.mask))
            elif adapters is not None and adapters.adapter(i, skipped) is not None:
                x = layer.input_layernorm(hidden)
                if prompt.mask is not None:  # prefill (or a checkpoint's recompute of it): pool now
                    prompt.state[i] = adapters.router_state(i, skipped, x, prompt.mask)
                x = adapters(i, skipped, x, *prompt.state[i])
                if skipped:
                    if i not in self._skip_mlp:
                        hidden = hidden + layer.mlp(layer.post_attention_layernorm.weight * x)
                    return hidden, None
        if not skipped:
            attn_out, weights = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden) if x is None else x,
                attention_mask=mask,
                position_ids=text_ids,
                position_embeddings=position_embeddings,
                **compat.cache_kwargs(cache),
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
        past_key_values = compat.take_cache({"cache": cache, "past_key_values": past_key_values}, kwargs)
        compat.check_forward_kwargs(kwargs)
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
        prompt = None
        if ADAPTERS in self._modules or MERGER in self._modules:
            prompt = self._prompt(attention_mask, inputs_embeds, cache)
        hidden = inputs_embeds
        frame = Frame(
            None,
            None,
            text_ids,
            rope_ids,
            self.rotary_emb(hidden, rope_ids),
            lambda: self._masks(attention_mask, inputs_embeds, cache, text_ids),
        )
        ids = input_ids if input_ids is not None else self.__dict__.get(_INPUT_IDS)
        tokens = self._token_exit(frame, cache, ids, attention_mask, inputs_embeds)
        pooling = prompt.mask if prompt is not None else None
        grows = self._cache_lengths(cache) if use_cache else None

        layer_types = self.facts.layer_types
        want_hidden = output_hidden_states or getattr(self.config, "output_hidden_states", False)
        all_hidden: list[torch.Tensor] | None = [] if want_hidden else None
        all_attn: list[torch.Tensor | None] | None = [] if output_attentions else None
        for i, layer in enumerate(self.layers[: self.facts.num_layers]):
            watch = contextlib.nullcontext()
            if tokens is not None:
                hidden = tokens.before_layer(i, hidden)
                if tokens.frame is not frame:
                    frame = tokens.frame
                    if pooling is not None and frame.index is not None:  # adapters pool over kept tokens
                        prompt.mask = gather_tokens(pooling, frame.index) & frame.mask
                watch = tokens.watch(i, layer)
            if all_hidden is not None:
                all_hidden.append(tokens.expand(hidden) if tokens is not None else hidden)
            run = functools.partial(
                self._layer,
                i,
                layer,
                frame.attention_mask(layer_types[i]) if i not in self._skip_attn else None,
                frame.text_ids,
                cache,
                frame.position_embeddings,
                kwargs,
                prompt,
            )
            with watch:
                if checkpointing:
                    hidden, weights = torch.utils.checkpoint.checkpoint(run, hidden, use_reentrant=False)
                else:
                    hidden, weights = run(hidden)
            if all_attn is not None and i not in self._skip_attn:
                all_attn.append(weights)
        if grows is not None:
            self._check_cache_grew(cache, grows)
        if tokens is not None:
            hidden = tokens.expand(hidden)
            if not tokens.decoding:
                object.__setattr__(self, "_last_exit_layers", list(tokens.state.exit_layers))
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return compat.decoder_output(
            hidden,
            cache if use_cache else None,
            tuple(all_hidden) if all_hidden is not None else None,
            tuple(all_attn) if all_attn is not None else None,
        )

    def _cache_lengths(self, cache: Cache | None) -> dict[int, int] | None:
        """Tokens held now by the cache layer of every attention the plan runs."""
        if cache is None:
            return None
        kept = [i for i in range(self.facts.num_layers) if i not in self._skip_attn]
        return {i: compat.layer_length(cache.layers[i]) for i in kept}

    def _check_cache_grew(self, cache: Cache, before: dict[int, int]) -> None:
        """Raise if an attention that ran did not store its keys and values in ``cache``.

        A transformers release that hands the attention modules the cache under a new name would
        otherwise decode from an empty cache and return wrong tokens without an error.
        """
        stale = [i for i, n in before.items() if compat.layer_length(cache.layers[i]) <= n]
        if stale:
            raise RuntimeError(
                compat.unsupported(f"the KV cache was not used (layers {stale} stored nothing)")
            )


def _remember_ids(model: nn.Module, args: tuple, kwargs: dict, path: str) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    decoder = model.get_submodule(path)
    decoder.__dict__[_INPUT_IDS] = ids if isinstance(ids, torch.Tensor) else None


def _forget_ids(model: nn.Module, args: tuple, kwargs: dict, output: Any, path: str) -> None:
    model.get_submodule(path).__dict__.pop(_INPUT_IDS, None)


def exit_layers(model: nn.Module) -> list[int] | None:
    """Per example of the last prefill, the first decoder layer that ran without (some of) its visual
    tokens; the number of layers for an example that kept them all. None if the plan withdraws none."""
    decoder = decoder_slot(model, arch_facts(model))[2]  # an EASModel resolves through its base model
    return decoder.last_exit_layers if isinstance(decoder, SkipDecoder) else None


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Make ``model`` execute ``plan``, in place.

    Applying an empty ``Plan()`` puts the stock text model back, so the model runs exactly as it was
    loaded. Weights are never changed or freed by this call. The plan is also written to the model's
    config (``skipvlm_plan``), so ``save_pretrained`` carries it and :func:`skipvlm.load_pretrained`
    restores it.

    Args:
        model: a supported transformers model (see :data:`skipvlm.arch.SUPPORTED_MODEL_TYPES`), or a
            wrapper of one with ``get_base_model()`` such as a PEFT ``PeftModel``.
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
    target = unwrap(model)  # hooks and the config belong to the transformers model, not its wrapper
    facts = arch_facts(target)
    plan.validate_for(facts.num_layers)
    parent, name, decoder = decoder_slot(target, facts)
    if isinstance(decoder, SkipDecoder):
        owns_modules = ADAPTERS in decoder._modules or MERGER in decoder._modules
        if plan.is_empty and not owns_modules:
            setattr(parent, name, decoder.unwrap())
        else:
            decoder.plan = plan
            decoder.watch_inputs(target)
    elif not plan.is_empty:
        decoder = SkipDecoder(decoder, facts, plan)
        setattr(parent, name, decoder)
        decoder.watch_inputs(target)
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


@contextlib.contextmanager
def use_plan(model: nn.Module, plan: Plan) -> Iterator[nn.Module]:
    """Run ``model`` (a transformers model, an :class:`~skipvlm.EASModel` or a PEFT ``PeftModel``) under
    ``plan`` in the block, then put its previous plan back."""
    setter = getattr(model, "set_plan", None)
    previous = current_plan(model)
    (setter or functools.partial(apply_plan, model))(plan)
    try:
        yield model
    finally:
        (setter or functools.partial(apply_plan, model))(previous)
