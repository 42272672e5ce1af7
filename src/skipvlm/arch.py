"""Per-architecture facts read from ``model.config``: where the decoder layers live and what they hold.

Everything skipvlm does to a model (skip plans, adapters, token exit, cost accounting) asks this module
where things are, so that no other file decides anything by model *name*. The facts come from the
config alone (``model_type`` of the top config and of its text config); the model object is only used
to resolve the dotted paths the facts name. See ``shared/METHODS.md`` §1 for the layer notation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PretrainedConfig

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ArchFacts",
    "HostFamily",
    "LayerHook",
    "LayerParts",
    "UnsupportedModelError",
    "arch_facts",
    "decoder_slot",
    "encoder_host",
    "get_decoder",
    "get_layers",
    "host_family",
    "model_class",
    "register_host",
    "unwrap",
    "visual_token_mask",
]


class UnsupportedModelError(ValueError):
    """The model's architecture is not one skipvlm knows how to run."""


@dataclass(frozen=True)
class LayerParts:
    """The sub-modules of one decoder layer and how its norms scale (``shared/METHODS.md`` §1-§2).

    A layer computes ``a = h + N_ao(Attn(N_in(h)))`` and ``out = a + N_mo(MLP(N_pre(a)))``, where the
    output norms ``N_ao`` / ``N_mo`` are the identity when absent (Llama, Qwen2) and Gemma's "sandwich"
    norms when present. Every norm is an RMSNorm ``N(x) = rms(x) * gain``; ``gain = gain_offset + weight``
    (Llama: ``weight``; Gemma: ``1 + weight``).

    Args:
        attention, mlp: attribute names of the attention and the MLP.
        input_norm: the pre-attention norm ``N_in``.
        pre_mlp_norm: the pre-MLP norm ``N_pre`` (Llama calls it ``post_attention_layernorm``).
        attention_out_norm: the norm on the attention output ``N_ao``, if the layer has one.
        mlp_out_norm: the norm on the MLP output ``N_mo``, if the layer has one.
        gain_offset: added to a norm's ``weight`` to give its gain.
    """

    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    pre_mlp_norm: str = "post_attention_layernorm"
    attention_out_norm: str | None = None
    mlp_out_norm: str | None = None
    gain_offset: float = 0.0

    def gain(self, norm: nn.Module) -> torch.Tensor:
        """(C,) the gain a norm multiplies the normalised input by: its weight itself, or ``offset +
        weight`` in float32 (as Gemma's norm computes it; a half-precision sum would round it)."""
        return norm.weight.float() + self.gain_offset if self.gain_offset else norm.weight

    def unit_gain_(self, norm: nn.Module) -> None:
        """Set a norm's gain to 1 in place (its weight to ``1 - gain_offset``)."""
        norm.weight.fill_(1.0 - self.gain_offset)

    def unit_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A norm weight of the shape of ``weight`` whose gain is 1."""
        return torch.full_like(weight, 1.0 - self.gain_offset)


@dataclass(frozen=True)
class HostFamily:
    """Everything skipvlm needs to know about one model family, in one entry (see :func:`register_host`).

    Args:
        model_type: ``model_type`` of the top-level config (what ``from_pretrained`` dispatches on).
        model_class: the transformers generation class loaders and presets instantiate.
        decoder_path: dotted path from the top-level model to the text model that owns ``layers``.
        rope: ``"default"`` (1-D positions), ``"mrope"`` (Qwen2-VL's 3-D multimodal positions) or
            ``"mrope_text"`` (Qwen3-VL's: the same, but 1-D or missing position ids also serve as the
            text positions of masks and attention, as its text model builds them).
        text_types: allowed text-config model types of a composite model (empty: the model is its own
            text model).
        projector_path: dotted path to the multimodal projector, if any.
        visual_tokens: ``visual_tokens(config, images, image_patches)``: visual tokens in a prompt, for
            cost accounting (None: text-only).
        vision_macs: ``vision_macs(config, images, image_patches, sdp)`` -> (vision tower MACs,
            projector MACs) of a prompt's images, for cost accounting (None: text-only); ``sdp=False``
            leaves out the attention's ``N^2`` score / value terms (the ``paper`` convention).
        description: how the supported-models list names it (default: ``model_class``).
        parts: the sub-modules of a decoder layer and its norm layout (:class:`LayerParts`).
        rotary_per_layer_type: the text model keeps one rotary table per layer type (Gemma 3: local
            for sliding layers, global for full ones), computed as ``rotary_emb(x, ids, layer_type)``.
        image_blocks: image tokens attend bidirectionally within each image (Gemma 3), through the
            ``token_type_ids`` the top-level model is called with.
        image_token_attrs / video_token_attrs: config attributes holding the placeholder token ids.
        forward_hook: ``forward_hook(kwargs)`` -> a :class:`LayerHook` or None: takes the family's own
            keywords of the text model's ``forward`` out of ``kwargs`` (e.g. Qwen3-VL's DeepStack
            features) and returns what the layer loop runs after each layer (None: the family has none).
        encoder: for a host that is not a decoder (a two-stream encoder such as BridgeTower, METHODS
            §7), the object that runs plans, adapters and MAC counts on it
            (:class:`skipvlm.encoders.host.EncoderHost`); :func:`skipvlm.apply_plan`,
            :func:`skipvlm.get_eas_model`, search and training hand such a model to it, and
            :func:`arch_facts` (the decoder facts) refuses it.
    """

    model_type: str
    model_class: str
    decoder_path: str = "model"
    rope: str = "default"
    text_types: tuple[str, ...] = ()
    projector_path: str | None = None
    visual_tokens: Callable[[PretrainedConfig, int, int], int] | None = None
    vision_macs: Callable[..., tuple[int, int]] | None = None
    description: str = ""
    parts: LayerParts = LayerParts()
    rotary_per_layer_type: bool = False
    image_blocks: bool = False
    image_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_attrs: tuple[str, ...] = ("video_token_id",)
    forward_hook: Callable[[dict[str, Any]], LayerHook | None] | None = None
    encoder: Any = None


class LayerHook(Protocol):
    """What a host family adds to one forward of the layer loop (see :attr:`HostFamily.forward_hook`)."""

    def after_layer(
        self, i: int, h: torch.Tensor, index: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The hidden states after layer ``i``'s route, given the current token layout: ``index`` (B, T')
        maps slots to original positions and ``mask`` (B, T') marks real slots (both None: the forward's
        own positions)."""
        ...


_HOSTS: dict[str, HostFamily] = {}


def _builtins() -> dict[str, HostFamily]:
    """The registry, with the built-in families (:mod:`skipvlm.hosts`) loaded first."""
    import skipvlm.hosts  # noqa: F401  (registers the built-in families once)

    return _HOSTS


def register_host(family: HostFamily) -> HostFamily:
    """Add a model family: plans, adapters, token exit and cost accounting then support it. A family
    of a ``model_type`` already registered replaces it (the built-in ones load first). Returns it."""
    _builtins()[family.model_type] = family
    return family


def host_family(model_type: str) -> HostFamily:
    """The registered family of a config ``model_type``.

    Raises:
        UnsupportedModelError: none is registered; the message lists the supported ones.
    """
    family = _builtins().get(model_type)
    if family is None:
        raise _unsupported(f"model_type {model_type!r} is not supported")
    return family


class _Supported(Mapping):
    """model_type -> the supported family's name, read live from the registry."""

    def __getitem__(self, model_type: str) -> str:
        family = _builtins()[model_type]
        return family.description or family.model_class

    def __iter__(self) -> Iterator[str]:
        return iter(list(_builtins()))

    def __len__(self) -> int:
        return len(_builtins())


SUPPORTED_MODEL_TYPES: Mapping[str, str] = _Supported()


@dataclass(frozen=True)
class ArchFacts:
    """What skipvlm needs to know about one model, derived from its config.

    Attributes:
        model_type: ``model_type`` of the top-level config (e.g. ``"llava"``).
        text_model_type: ``model_type`` of the decoder's config (e.g. ``"llama"``).
        text_config: the decoder's config object (shared with the model, not a copy).
        decoder_path: dotted attribute path from the top-level model to the text model.
        num_layers: number of decoder layers L.
        hidden_size: C.
        intermediate_size: F, the MLP width.
        num_attention_heads / num_key_value_heads / head_dim: attention shapes.
        vocab_size: V.
        rope: ``"default"``, ``"mrope"`` or ``"mrope_text"`` (see :class:`HostFamily`).
        layer_types: per layer, ``"full_attention"`` or ``"sliding_attention"``.
        image_token_id: id of the image placeholder token, ``None`` for text-only models.
        video_token_id: id of the video placeholder token where the architecture has one.
        projector_path: dotted path to the multimodal projector (``None`` for text-only models).
        family: the registered :class:`HostFamily` entry these facts were read with.
    """

    model_type: str
    text_model_type: str
    text_config: PretrainedConfig
    decoder_path: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rope: str
    layer_types: tuple[str, ...]
    image_token_id: int | None = None
    video_token_id: int | None = None
    projector_path: str | None = None
    family: HostFamily | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.image_token_id is not None

    @property
    def parts(self) -> LayerParts:
        return self.family.parts if self.family is not None else LayerParts()

    @property
    def attention_name(self) -> str:
        return self.parts.attention

    @property
    def mlp_name(self) -> str:
        return self.parts.mlp

    @property
    def input_norm_name(self) -> str:
        return self.parts.input_norm

    @property
    def post_norm_name(self) -> str:
        """The pre-MLP norm (Llama's ``post_attention_layernorm``)."""
        return self.parts.pre_mlp_norm

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose positions hold visual tokens (image, and video where it has one)."""
        ids = (self.image_token_id, self.video_token_id)
        return tuple(int(i) for i in ids if i is not None)


def visual_token_mask(input_ids: torch.Tensor, facts: ArchFacts) -> torch.Tensor:
    """(B, T) bool: the positions of ``input_ids`` that hold visual tokens (image or video)."""
    ids = torch.tensor(facts.visual_token_ids, device=input_ids.device, dtype=input_ids.dtype)
    return torch.isin(input_ids, ids)


def _unsupported(what: str) -> UnsupportedModelError:
    names = "\n".join(f"  - {cls} (model_type={mt!r})" for mt, cls in SUPPORTED_MODEL_TYPES.items())
    return UnsupportedModelError(f"{what}. skipvlm supports these architectures:\n{names}")


def _layer_types(text_config: PretrainedConfig, num_layers: int) -> tuple[str, ...]:
    types = getattr(text_config, "layer_types", None)
    if types is not None:
        return tuple(types)
    # Mistral keeps one `sliding_window` for every layer instead of a `layer_types` list.
    sliding = getattr(text_config, "sliding_window", None)
    return ("sliding_attention" if sliding is not None else "full_attention",) * num_layers


def arch_facts(model_or_config: nn.Module | PretrainedConfig) -> ArchFacts:
    """Read the architecture facts of a supported model from its config.

    Args:
        model_or_config: a transformers model (its ``.config`` is read) or a config.

    Returns:
        The :class:`ArchFacts` of the model.

    Raises:
        UnsupportedModelError: the architecture (or a composite model's text model) is not supported;
            the message lists the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}; "
            "load the model with transformers first (e.g. AutoModelForCausalLM.from_pretrained)"
        )
    model_type = getattr(config, "model_type", "")
    family = host_family(model_type)
    if family.encoder is not None:
        raise UnsupportedModelError(
            f"{family.description or family.model_class} (model_type={model_type!r}) is a two-stream encoder "
            "host (skipvlm.encoders): it runs plans, EAS adapters, search, training and MAC counts through "
            "its own entry; this decoder-only feature (token exit, merging, generation, LoRA layer lists, "
            "decoder benchmarks) does not apply to it"
        )
    text_config = config.get_text_config(decoder=True)
    text_type = getattr(text_config, "model_type", "")
    if family.text_types and text_type not in family.text_types:
        raise _unsupported(f"{model_type!r} with a {text_type!r} text model is not supported")

    num_layers = int(text_config.num_hidden_layers)
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    image_token_id = _first_attr(config, family.image_token_attrs)
    video_token_id = _first_attr(config, family.video_token_attrs)
    return ArchFacts(
        model_type=model_type,
        text_model_type=text_type,
        text_config=text_config,
        decoder_path=family.decoder_path,
        num_layers=num_layers,
        hidden_size=int(text_config.hidden_size),
        intermediate_size=int(text_config.intermediate_size),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab_size=int(text_config.vocab_size),
        rope=family.rope,
        layer_types=_layer_types(text_config, num_layers),
        image_token_id=None if image_token_id is None else int(image_token_id),
        video_token_id=None if video_token_id is None else int(video_token_id),
        projector_path=family.projector_path,
        family=family,
    )


def encoder_host(model_or_config: Any) -> Any:
    """The :attr:`HostFamily.encoder` of a model (wrappers unwrapped) or config, or None for a decoder host
    or an unsupported model."""
    config = getattr(unwrap(model_or_config), "config", model_or_config)
    family = _builtins().get(getattr(config, "model_type", None))
    return family.encoder if family is not None else None


def _first_attr(config: PretrainedConfig, names: tuple[str, ...]) -> Any:
    return next((v for v in (getattr(config, n, None) for n in names) if v is not None), None)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper that hands it out with ``get_base_model()`` (a PEFT
    ``PeftModel``); ``model`` itself otherwise. The wrapper's LoRA layers live inside that model, so a
    plan applied to it runs them."""
    seen = set()
    while callable(getattr(model, "get_base_model", None)) and id(model) not in seen:
        seen.add(id(model))
        inner = model.get_base_model()
        if inner is model or not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def decoder_slot(model: nn.Module, facts: ArchFacts) -> tuple[nn.Module, str, nn.Module]:
    """Where the text model sits: (parent module, attribute name, the text model itself).

    ``model`` may be wrapped (see :func:`unwrap`); the slot is found in the model it wraps.
    """
    model = unwrap(model)
    path = facts.decoder_path
    parent = model
    *head, last = path.split(".")
    for name in head:
        parent = getattr(parent, name, None)
        if parent is None:
            break
    child = getattr(parent, last, None) if parent is not None else None
    if not isinstance(child, nn.Module):
        raise _unsupported(
            f"{type(model).__name__} has no decoder at `{path}`; pass the full generation model "
            "(a *ForCausalLM or *ForConditionalGeneration class), not a bare backbone"
        )
    return parent, last, child


def get_decoder(model: nn.Module, facts: ArchFacts | None = None) -> nn.Module:
    """The text model that owns the decoder layers (a skipvlm runtime wrapper once a plan is applied)."""
    facts = facts or arch_facts(model)
    return decoder_slot(model, facts)[2]


def get_layers(model: nn.Module, facts: ArchFacts | None = None) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    layers = get_decoder(model, facts).layers
    if not isinstance(layers, nn.ModuleList):
        raise _unsupported(f"{type(model).__name__}'s decoder has no `layers` list")
    return layers


def model_class(config: PretrainedConfig) -> type:
    """The transformers generation-model class for a supported config.

    Raises:
        UnsupportedModelError: the architecture is not supported.
    """
    import transformers

    family = host_family(getattr(config, "model_type", ""))
    if family.encoder is not None:
        return getattr(transformers, family.model_class)
    facts = arch_facts(config)
    return getattr(transformers, host_family(facts.model_type).model_class)
