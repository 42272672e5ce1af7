"""The model families skipvlm runs: one :class:`~skipvlm.arch.HostFamily` entry each.

Adding a family is an entry here (or in a file of its own that calls
:func:`~skipvlm.arch.register_host`) plus its tests: plans, adapters, token exit and cost accounting
read everything they need from the entry and the model's config. Vision-tower MAC rules live beside
the families that use them (``shared/METHODS.md`` §6 counts MACs).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

from skipvlm.arch import HostFamily, LayerParts, register_host
from skipvlm.deepstack import take_deepstack

__all__: list[str] = []


def _block_macs(e: int, f: int, tokens: int, sdp: bool) -> int:
    """One pre-norm transformer block of width ``e`` and FFN ``f`` over ``tokens`` tokens: the projections
    and the two-layer MLP, plus (``sdp``) the ``2 N^2 e`` of the scores and values."""
    return tokens * (4 * e * e + 2 * e * f) + (2 * tokens * tokens * e if sdp else 0)


def _vit_macs(vision: PretrainedConfig, patches: int, tokens: int, sdp: bool = True) -> int:
    """One ViT pass over ``patches`` patches (``tokens`` sequence length with any class token)."""
    e, f = vision.hidden_size, vision.intermediate_size
    channels = getattr(vision, "num_channels", 3)
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return patches * e * channels * patch**2 + vision.num_hidden_layers * _block_macs(e, f, tokens, sdp)


def _clip_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    vision = config.vision_config
    return images * (vision.image_size // vision.patch_size) ** 2


def _clip_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """A CLIP-style tower over each image (patch embedding, attention + MLP per layer), then LLaVA's
    two-layer projector per visual token."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    e = vision.hidden_size
    patches = (vision.image_size // vision.patch_size) ** 2
    tower = _vit_macs(vision, patches, patches + 1, sdp)  # the class token joins the sequence
    return images * tower, images * patches * (e * c + c * c)


def _qwen_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    return images * image_patches // config.vision_config.spatial_merge_size**2


def _qwen_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """Qwen2-VL's tower over each image of ``image_patches`` 14x14 patches: 3-D patch embedding,
    full-attention blocks, then the 2x2 patch merger into the text hidden size (counted in the tower)."""
    vision, patches = config.vision_config, image_patches
    e = vision.embed_dim
    f = int(e * vision.mlp_ratio)
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    per_block = _block_macs(e, f, patches, sdp)
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


# --- Qwen3, Mistral 3, InternVL, LLaVA-NeXT / OneVision, Idefics3 / SmolVLM (issue 17) -------------------
#
# Every family below runs the stock LLaMA-style layer (q/k norms, where Qwen3 has them, live inside the
# attention module), so the plain routes and the PIA merges apply unchanged. Visual tokens are the
# positions the processor filled with the image (or video) placeholder id: the model scatters its image
# features, any-resolution tiles and inserted newline features included, exactly into those positions
# (each model checks the count), so `visual_token_mask` covers all of them. Break / separator tokens
# around an image (Pixtral's [IMG_BREAK], InternVL's <img>, Idefics3's <fake_token_around_image>) are
# ordinary text tokens and stay.


def _tile_side(vision: PretrainedConfig) -> int:
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return size // patch


def _tiles(vision: PretrainedConfig, image_patches: int) -> tuple[int, int]:
    """(tiles the tower runs on, tiles in the any-resolution grid) of an image of ``image_patches``
    patches (at the tower's patch size, as for Qwen2-VL; 1024 = a 448 px image at 14 px patches): the
    grid covers it with tiles of the tower's size, and a grid of several tiles adds the whole image
    downscaled to one tile (LLaVA-NeXT's base image, InternVL's thumbnail, Idefics3's global image)."""
    side = _tile_side(vision)
    grid = max(1, -(-int(image_patches) // (side * side)))
    return (grid + 1 if grid > 1 else 1), (grid if grid > 1 else 0)


def _anyres_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    """LLaVA-NeXT / OneVision: every tile's patch grid, plus the newline feature the model appends to
    each row of the tiled grid (a square grid: sqrt(grid tiles) * side rows)."""
    side = _tile_side(config.vision_config)
    tiles, grid = _tiles(config.vision_config, image_patches)
    rows = math.ceil(math.sqrt(grid)) * side if grid else 0
    return images * (tiles * side * side + rows)


def _anyres_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """The CLIP / SigLIP tower once per tile, then the two-layer projector per visual token."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    side, (tiles, _) = _tile_side(vision), _tiles(vision, image_patches)
    tokens = side * side + (1 if vision.model_type == "clip_vision_model" else 0)
    tower = tiles * _vit_macs(vision, side * side, tokens, sdp)
    per_token = vision.hidden_size * c + c * c
    return images * tower, images * tiles * side * side * per_token


def _internvl_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    return images * _tiles(config.vision_config, image_patches)[0] * int(config.image_seq_length)


def _internvl_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """InternViT once per tile (class token included), then the pixel-shuffle MLP projector."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    side, (tiles, _) = _tile_side(vision), _tiles(vision, image_patches)
    tower = tiles * _vit_macs(vision, side * side, side * side + 1, sdp)
    shuffled = int(vision.hidden_size / config.downsample_ratio**2)
    per_token = shuffled * c + c * c
    return images * tower, images * tiles * int(config.image_seq_length) * per_token


def _idefics3_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    side = _tile_side(config.vision_config)
    return images * _tiles(config.vision_config, image_patches)[0] * side * side // config.scale_factor**2


def _idefics3_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """The SigLIP tower once per tile, then the pixel-shuffle connector (one linear layer)."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    side, (tiles, _) = _tile_side(vision), _tiles(vision, image_patches)
    tower = tiles * _vit_macs(vision, side * side, side * side, sdp)
    per_token = vision.hidden_size * config.scale_factor**2 * c
    return images * tower, _idefics3_tokens(config, images, image_patches) * per_token


def _pixtral_tokens(config: PretrainedConfig, images: int, image_patches: int) -> int:
    """Pixtral at the image's own resolution (``image_patches`` patches), merged ``spatial_merge_size``^2."""
    return images * int(image_patches) // config.spatial_merge_size**2


def _pixtral_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """Pixtral's tower over the image's patches, then the patch merger and the two-layer projector."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    patches, merge = int(image_patches), config.spatial_merge_size**2
    e = vision.hidden_size
    tokens = patches // merge
    projector = patches // merge * (merge * e * e) + tokens * (e * c + c * c)
    return images * _vit_macs(vision, patches, patches, sdp), images * projector


register_host(HostFamily("qwen3", "Qwen3ForCausalLM"))
register_host(
    HostFamily(
        "mistral3",
        "Mistral3ForConditionalGeneration",
        decoder_path="model.language_model",
        text_types=("mistral",),
        projector_path="model.multi_modal_projector",
        visual_tokens=_pixtral_tokens,
        vision_macs=_pixtral_macs,
        description="Mistral3ForConditionalGeneration (Mistral text model)",
    )
)
register_host(
    HostFamily(
        "internvl",
        "InternVLForConditionalGeneration",
        decoder_path="model.language_model",
        text_types=("qwen2", "qwen3", "llama"),
        projector_path="model.multi_modal_projector",
        visual_tokens=_internvl_tokens,
        vision_macs=_internvl_macs,
        description="InternVLForConditionalGeneration (Qwen2, Qwen3 or Llama text model)",
    )
)
for _model_type, _class, _texts in (
    ("llava_next", "LlavaNextForConditionalGeneration", ("llama", "mistral", "qwen2")),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration", ("qwen2", "llama")),
):
    register_host(
        HostFamily(
            _model_type,
            _class,
            decoder_path="model.language_model",
            text_types=_texts,
            projector_path="model.multi_modal_projector",
            visual_tokens=_anyres_tokens,
            vision_macs=_anyres_macs,
            description=f"{_class} ({', '.join(t.capitalize() for t in _texts)} text model)",
        )
    )
for _model_type, _class in (
    ("idefics3", "Idefics3ForConditionalGeneration"),
    ("smolvlm", "SmolVLMForConditionalGeneration"),
):
    register_host(
        HostFamily(
            _model_type,
            _class,
            decoder_path="model.text_model",
            text_types=("llama",),
            projector_path="model.connector",
            visual_tokens=_idefics3_tokens,
            vision_macs=_idefics3_macs,
            description=f"{_class} (Llama text model)",
        )
    )


# --- Qwen3-VL: interleaved M-RoPE, q/k norms inside the attention, DeepStack -----------------------------


def _qwen3_vl_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """Qwen3-VL's tower over each image of ``image_patches`` patches: 3-D patch embedding, full-attention
    blocks with a two-layer GELU MLP, then the 2x2 patch merger and one DeepStack merger per
    ``deepstack_visual_indexes`` entry (each ``merge*e -> merge*e -> C``), all counted in the tower."""
    vision, patches = config.vision_config, image_patches
    e, f = vision.hidden_size, vision.intermediate_size
    patch_in = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    merge = vision.spatial_merge_size**2
    per_block = _block_macs(e, f, patches, sdp)
    mergers = 1 + len(vision.deepstack_visual_indexes)
    merger = patches // merge * (merge * e * merge * e + merge * e * vision.out_hidden_size)
    return images * (patches * e * patch_in + vision.depth * per_block + mergers * merger), 0


register_host(
    HostFamily(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        decoder_path="model.language_model",
        rope="mrope_text",
        text_types=("qwen3_vl_text",),
        projector_path="model.visual.merger",
        visual_tokens=_qwen_tokens,
        vision_macs=_qwen3_vl_macs,
        forward_hook=take_deepstack,
        description="Qwen3VLForConditionalGeneration (DeepStack, interleaved M-RoPE)",
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


def _gemma3_macs(
    config: PretrainedConfig, images: int, image_patches: int, sdp: bool = True
) -> tuple[int, int]:
    """A SigLIP tower over each image (patch embedding, attention + MLP per layer, no class token), then
    Gemma 3's projector: average pooling to ``mm_tokens_per_image`` tokens and one linear map each."""
    vision, c = config.vision_config, config.get_text_config(decoder=True).hidden_size
    n = (vision.image_size // vision.patch_size) ** 2
    tower = _vit_macs(vision, n, n, sdp)
    return images * tower, images * config.mm_tokens_per_image * vision.hidden_size * c


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


# --- two-stream encoders (issue 16): BridgeTower, the METER family, registers itself -------------------

from skipvlm.encoders import host as _bridgetower  # noqa: E402, F401
