"""Shapes of real architectures (configs only, no weights) for accounting and timing.

Speed does not depend on trained weights, so a model built from one of these configs with random
weights times like the real checkpoint. Build on the ``meta`` device to count MACs or bytes for free;
materialise on a real device to time it.

Shapes follow the public model cards: LLaVA-1.5 (CLIP ViT-L/14 at 336 px + Vicuna), the LLaVA v1
model of the EAS paper (CLIP ViT-L/14 at 224 px + Vicuna-7B), Qwen2-VL, Llama-2; and the ``config.json``
files of Qwen/Qwen3-8B, llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-onevision-qwen2-7b-ov-hf,
OpenGVLab/InternVL3-8B-hf, HuggingFaceTB/SmolVLM-Instruct, mistralai/Mistral-Small-3.1-24B-Instruct-2503
and Qwen/Qwen3-VL-8B-Instruct (each builder names its source); Gemma 3 (SigLIP-400M at 896 px, 256 image
tokens; five sliding-window layers per full one); LaVIN-7B (LLaMA-7B + CLIP ViT-L/14 at 224 px). The
small ``*-cpu`` presets are the benchmark shapes that fit a laptop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn

from skipvlm.arch import model_class

__all__ = ["PRESETS", "build", "get", "names"]


def _clip(image_size: int) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        projection_dim=768,
    )


def _llama(hidden: int, ffn: int, layers: int, heads: int, vocab: int = 32064, kv: int | None = None) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )


def _llava(
    image_size: int, text: dict, image_token: int = 32000, vision: tf.CLIPVisionConfig | None = None
) -> tf.LlavaConfig:
    return tf.LlavaConfig(
        vision_config=vision or _clip(image_size),
        text_config=tf.LlamaConfig(**text),
        image_token_id=image_token,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _qwen2_vl(
    hidden: int, ffn: int, layers: int, heads: int, kv: int, vocab: int, tie: bool
) -> tf.Qwen2VLConfig:
    text = dict(
        tie_word_embeddings=tie,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=32,
        embed_dim=1280,
        hidden_size=hidden,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
    )
    return tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def _siglip(layers: int, image_size: int = 384) -> dict:
    """SigLIP-so400m/14 (the towers of LLaVA-OneVision and SmolVLM; OneVision drops the last layer)."""
    return dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
    )


def _qwen3(hidden: int, ffn: int, layers: int, heads: int, kv: int, tie: bool) -> tf.Qwen3Config:
    return tf.Qwen3Config(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        tie_word_embeddings=tie,
    )


def _qwen2_7b(vocab: int) -> dict:
    """Qwen2 / Qwen2.5-7B: the text models of LLaVA-OneVision-7B and InternVL3-8B."""
    return dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def _llava_next_mistral_7b() -> tf.LlavaNextConfig:
    """llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14 at 336 px, any-resolution grid, Mistral-7B."""
    text = _llama(4096, 14336, 32, 32, vocab=32064, kv=8)
    return tf.LlavaNextConfig(
        vision_config=_clip(336),
        text_config=tf.MistralConfig(**text),
        image_token_index=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _llava_onevision_7b() -> tf.LlavaOnevisionConfig:
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP (26 of its layers) at 384 px tiles, Qwen2-7B."""
    grid = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**_siglip(26), vision_use_head=False),
        text_config=tf.Qwen2Config(**_qwen2_7b(152128)),
        image_token_index=151646,
        video_token_index=151647,
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )


def _internvl3_8b() -> tf.InternVLConfig:
    """OpenGVLab/InternVL3-8B-hf: InternViT-300M at 448 px tiles, pixel shuffle to 256 tokens, Qwen2.5-7B."""
    vision = tf.InternVLVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=448,
        patch_size=14,
        layer_scale_init_value=0.1,
    )
    return tf.InternVLConfig(
        vision_config=vision,
        text_config=tf.Qwen2Config(**_qwen2_7b(151674)),
        image_token_id=151667,
        image_seq_length=256,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _smolvlm_2b() -> tf.Idefics3Config:
    """HuggingFaceTB/SmolVLM-Instruct (model_type idefics3): SigLIP at 384 px, 3x3 pixel shuffle, SmolLM2."""
    text = tf.LlamaConfig(**_llama(2048, 8192, 24, 32, vocab=49155), rope_theta=273768.0)
    return tf.Idefics3Config(
        vision_config=tf.Idefics3VisionConfig(**_siglip(27)),
        text_config=text.to_dict(),
        image_token_id=49190,
        scale_factor=3,
        tie_word_embeddings=False,
    )


def _mistral_small_31_24b() -> tf.Mistral3Config:
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral (up to 1540 px, 14 px patches), 2x2 merge."""
    vision = tf.PixtralVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        head_dim=64,
        image_size=1540,
        patch_size=14,
    )
    text = tf.MistralConfig(
        **_llama(5120, 32768, 40, 32, vocab=131072, kv=8), head_dim=128, sliding_window=None
    )
    return tf.Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=10,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )


def _qwen3_vl(hidden: int, ffn: int, layers: int, heads: int, kv: int, tie: bool) -> tf.Qwen3VLConfig:
    """Qwen3-VL (``Qwen/Qwen3-VL-*-Instruct`` config.json): a Qwen3 text model with interleaved M-RoPE and a
    27-block SigLIP-2-style tower whose layers 8, 16 and 24 feed DeepStack."""
    text = dict(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=262144,
        rope_parameters=dict(
            rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True
        ),
    )
    vision = dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=hidden,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    )
    return tf.Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
    )


def _gemma3(hidden: int, ffn: int, layers: int, heads: int, kv: int) -> tf.Gemma3Config:
    text = tf.Gemma3TextConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=256,
        query_pre_attn_scalar=256,
        vocab_size=262208,
        sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        max_position_embeddings=131072,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=896,
        patch_size=14,
        vision_use_head=False,
    )
    return tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=256,
        image_token_id=262144,
        boi_token_id=255999,
        eoi_token_id=256000,
    )


def _clip_cpu(image_size: int, hidden: int, layers: int) -> tf.CLIPVisionConfig:
    """A small CLIP tower with ViT-L/14's patch grid (14 px patches): the visual-token count of the real
    tower at ``image_size``, at a CPU's cost."""
    return tf.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        projection_dim=hidden,
    )


PRESETS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "llava-1.5-7b": lambda: _llava(336, _llama(4096, 11008, 32, 32)),
    "llava-1.5-13b": lambda: _llava(336, _llama(5120, 13824, 40, 40)),
    "llava-v1-vicuna-7b-224": lambda: _llava(224, _llama(4096, 11008, 32, 32, vocab=32003)),
    # LaVIN-7B's shape (the EAS paper's LaVIN rows): LLaMA-7B with CLIP ViT-L/14 at 224 px in front, here
    # in the LLaVA layout (256 visual tokens); LaVIN's adapters (adapt-PIA, bottleneck 8, every layer) are
    # what `skipvlm bench --methods lavin` adds to it.
    "lavin-7b": lambda: _llava(224, _llama(4096, 11008, 32, 32, vocab=32000)),
    "qwen2-vl-2b": lambda: _qwen2_vl(1536, 8960, 28, 12, 2, 151936, tie=True),
    "qwen2-vl-7b": lambda: _qwen2_vl(3584, 18944, 28, 28, 4, 152064, tie=False),
    "llama-2-7b": lambda: tf.LlamaConfig(**_llama(4096, 11008, 32, 32, vocab=32000)),
    "qwen3-8b": lambda: _qwen3(4096, 12288, 36, 32, 8, tie=False),
    "llava-v1.6-mistral-7b": _llava_next_mistral_7b,
    "llava-onevision-qwen2-7b": _llava_onevision_7b,
    "internvl3-8b": _internvl3_8b,
    "smolvlm-2b": _smolvlm_2b,
    "mistral-small-3.1-24b": _mistral_small_31_24b,
    "qwen3-vl-8b": lambda: _qwen3_vl(4096, 12288, 36, 32, 8, tie=False),
    "gemma-3-4b": lambda: _gemma3(2560, 10240, 34, 8, 4),
    "gemma-3-12b": lambda: _gemma3(3840, 15360, 48, 16, 8),
    # the METER family (two-stream encoder): BridgeTower/bridgetower-base (RoBERTa-base text encoder, CLIP
    # ViT-B/16 at 288 px, 6 co-attention layers of width 768), the transformers defaults, VQA head of 3129
    # answers as METER's VQAv2 vocabulary
    "bridgetower-base": lambda: tf.BridgeTowerConfig(id2label={i: str(i) for i in range(3129)}),
    # CPU-sized shapes of the benchmarks
    "llama-cpu": lambda: tf.LlamaConfig(**_llama(384, 1024, 12, 6, vocab=8000)),
    "llama-cpu-wide": lambda: tf.LlamaConfig(**_llama(1024, 2816, 8, 8, vocab=8000)),
    # lavin-7b's depth (32 layers) and visual tokens (256: 224 px / 14 px patches) at a CPU's width
    "lavin-cpu": lambda: _llava(224, _llama(384, 1024, 32, 6, vocab=8000), 7999, _clip_cpu(224, 128, 2)),
    # the smallest LLaVA shape: the GPU suite's dry run (16 visual tokens, 8 layers)
    "llava-cpu-tiny": lambda: _llava(56, _llama(64, 128, 8, 4, vocab=1000), 999, _clip_cpu(56, 32, 1)),
}


def names() -> list[str]:
    """The preset names."""
    return sorted(PRESETS)


def get(name: str) -> tf.PretrainedConfig:
    """A fresh transformers config of the preset ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(names())}")
    return PRESETS[name]()


def build(
    name_or_config: str | tf.PretrainedConfig,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> nn.Module:
    """A model of the preset with random weights, in eval mode.

    Args:
        name_or_config: a preset name or a config.
        device: ``"meta"`` (no memory; for accounting) or a real device (for timing).
        dtype: the parameter dtype.
        seed: seed of the random weights.
    """
    config = get(name_or_config) if isinstance(name_or_config, str) else name_or_config
    cls = model_class(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()
