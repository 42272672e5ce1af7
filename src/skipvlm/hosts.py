"""The model families skipvlm runs: one :class:`~skipvlm.arch.HostFamily` entry each.

Adding a family is an entry here (or in a file of its own that calls
:func:`~skipvlm.arch.register_host`) plus its tests: plans, adapters, token exit and cost accounting
read everything they need from the entry and the model's config. Vision-tower MAC rules live beside
the families that use them (``shared/METHODS.md`` §6 counts MACs).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from skipvlm.arch import HostFamily, LayerParts, register_host

__all__: list[str] = []


def _clip_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    vision = config.vision_config
    return images * (vision.image_size // vision.patch_size) ** 2


def _clip_macs(config: PretrainedConfig, images: int, image_patches: int) -> tuple[int, int]:
    """A CLIP-style tower over each image (patch embedding, attention + MLP per layer), then LLaVA's
    two-layer projector per visual token."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    e, f = vision.hidden_size, vision.intermediate_size
    patches = (vision.image_size // vision.patch_size) ** 2
    n = patches + 1  # the class token
    embed = patches * e * vision.num_channels * vision.patch_size**2
    per_layer = n * (4 * e * e + 2 * e * f) + 2 * n * n * e
    tower = embed + vision.num_hidden_layers * per_layer
    return images * tower, images * patches * (e * c + c * c)


def _qwen_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    return images * image_patches // config.vision_config.spatial_merge_size**2


def _qwen_macs(config: PretrainedConfig, images: int, image_patches: int) -> tuple[int, int]:
    """Qwen2-VL's tower over each image of ``image_patches`` 14x14 patches: 3-D patch embedding,
    full-attention blocks, then the 2x2 patch merger into the text hidden size (counted in the tower)."""
    vision, patches = config.vision_config, image_patches
    e = vision.embed_dim
    f = int(e * vision.mlp_ratio)
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    per_block = patches * (4 * e * e + 2 * e * f) + 2 * patches * patches * e
    merger = patches // merge * (merge * e * merge * e + merge * e * vision.hidden_size)
    return images * (patches * e * patch_in + vision.depth * per_block + merger), 0


register_host(HostFamily("llama", "LlamaForCausalLM"))
register_host(HostFamily("mistral", "MistralForCausalLM"))
register_host(HostFamily("qwen2", "Qwen2ForCausalLM"))
register_host(
    HostFamily(
        "llava",
        "LlavaForConditionalGeneration",
        decoder_path="model.language_model",
        text_types=("llama", "mistral", "qwen2"),
        projector_path="model.multi_modal_projector",
        visual_tokens=_clip_tokens,
        vision_macs=_clip_macs,
        description="LlavaForConditionalGeneration (Llama, Mistral or Qwen2 text model)",
    )
)
for _model_type, _class in (
    ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
):
    register_host(
        HostFamily(
            _model_type,
            _class,
            decoder_path="model.language_model",
            rope="mrope",
            text_types=(f"{_model_type}_text", _model_type),
            projector_path="model.visual.merger",
            visual_tokens=_qwen_tokens,
            vision_macs=_qwen_macs,
        )
    )


# --- Gemma 3 ---------------------------------------------------------------------------------------------

# Sandwich norms: a norm on the attention output and one on the MLP output; pre-MLP norm
# `pre_feedforward_layernorm`; RMSNorm gain 1 + weight.
GEMMA3_PARTS = LayerParts(
    pre_mlp_norm="pre_feedforward_layernorm",
    attention_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    gain_offset=1.0,
)


def _gemma3_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    return images * config.mm_tokens_per_image


def _gemma3_macs(config: PretrainedConfig, images: int, image_patches: int) -> tuple[int, int]:
    """A SigLIP tower over each image (patch embedding, attention + MLP per layer, no class token), then
    Gemma 3's projector: average pooling to ``mm_tokens_per_image`` tokens and one linear map each."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    e, f = vision.hidden_size, vision.intermediate_size
    n = (vision.image_size // vision.patch_size) ** 2
    embed = n * e * vision.num_channels * vision.patch_size**2
    per_layer = n * (4 * e * e + 2 * e * f) + 2 * n * n * e
    tower = embed + vision.num_hidden_layers * per_layer
    return images * tower, images * config.mm_tokens_per_image * e * c


register_host(
    HostFamily(
        "gemma3_text",
        "Gemma3ForCausalLM",
        parts=GEMMA3_PARTS,
        rotary_per_layer_type=True,
    )
)
register_host(
    HostFamily(
        "gemma3",
        "Gemma3ForConditionalGeneration",
        decoder_path="model.language_model",
        text_types=("gemma3_text",),
        projector_path="model.multi_modal_projector",
        visual_tokens=_gemma3_tokens,
        vision_macs=_gemma3_macs,
        parts=GEMMA3_PARTS,
        rotary_per_layer_type=True,
        image_blocks=True,
    )
)
