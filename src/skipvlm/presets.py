"""Shapes of real architectures (configs only, no weights) for accounting and timing.

Speed does not depend on trained weights, so a model built from one of these configs with random
weights times like the real checkpoint. Build on the ``meta`` device to count MACs or bytes for free;
materialise on a real device to time it.

Shapes follow the public model cards: LLaVA-1.5 (CLIP ViT-L/14 at 336 px + Vicuna), the LLaVA v1
model of the EAS paper (CLIP ViT-L/14 at 224 px + Vicuna-7B), Qwen2-VL, Llama-2, Gemma 3 (SigLIP-400M
at 896 px, 256 image tokens; five sliding-window layers per full one). The small
``*-cpu`` presets are the benchmark shapes that fit a laptop.
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


def _llava(image_size: int, text: dict, image_token: int = 32000) -> tf.LlavaConfig:
    return tf.LlavaConfig(
        vision_config=_clip(image_size),
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


PRESETS: dict[str, Callable[[], tf.PretrainedConfig]] = {
    "llava-1.5-7b": lambda: _llava(336, _llama(4096, 11008, 32, 32)),
    "llava-1.5-13b": lambda: _llava(336, _llama(5120, 13824, 40, 40)),
    "llava-v1-vicuna-7b-224": lambda: _llava(224, _llama(4096, 11008, 32, 32, vocab=32003)),
    "qwen2-vl-2b": lambda: _qwen2_vl(1536, 8960, 28, 12, 2, 151936, tie=True),
    "qwen2-vl-7b": lambda: _qwen2_vl(3584, 18944, 28, 28, 4, 152064, tie=False),
    "llama-2-7b": lambda: tf.LlamaConfig(**_llama(4096, 11008, 32, 32, vocab=32000)),
    "gemma-3-4b": lambda: _gemma3(2560, 10240, 34, 8, 4),
    "gemma-3-12b": lambda: _gemma3(3840, 15360, 48, 16, 8),
    # CPU-sized shapes of the benchmarks
    "llama-cpu": lambda: tf.LlamaConfig(**_llama(384, 1024, 12, 6, vocab=8000)),
    "llama-cpu-wide": lambda: tf.LlamaConfig(**_llama(1024, 2816, 8, 8, vocab=8000)),
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
