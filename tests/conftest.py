"""Tiny random models of every supported architecture, built from configs (no downloads), seeded.

``build_model(arch)`` returns an eval-mode fp32 model with 4 decoder layers; ``make_inputs`` returns
model-ready, left-padded batches (with an image per prompt for the multimodal architectures).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.arch import get_layers

VOCAB = 128
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 100, 101, 102, 103
NUM_LAYERS = 4

TEXT_ARCHS = ("llama", "mistral", "qwen2")
VLM_ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_VL_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # image grids, M-RoPE, mm_token_type_ids
# Gemma 3 (sandwich norms, one rotary table per layer type, bidirectional image blocks).
GEMMA_TEXT_ARCHS = ("gemma3_text",)
GEMMA_VLM_ARCHS = ("gemma3",)
TEXT_ARCHS += GEMMA_TEXT_ARCHS
VLM_ARCHS += GEMMA_VLM_ARCHS
ALL_ARCHS = TEXT_ARCHS + VLM_ARCHS

# Image shapes: LLaVA's 16x16 image in 4x4 patches gives 16 image tokens; Qwen2-VL's 4x4 patch grid
# merged 2x2 gives 4 image tokens.
LLAVA_IMAGE_TOKENS = 16
QWEN_GRID = (1, 4, 4)
QWEN_IMAGE_TOKENS = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2] // 4
QWEN_PATCH_DIM = 3 * 2 * 2 * 2  # channels * temporal_patch * patch * patch


def text_config_kwargs(num_layers: int = NUM_LAYERS, **overrides) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kw


# LLaVA with another text model than Llama: arch name -> the text config class.
LLAVA_TEXT = {"llava": tf.LlamaConfig, "llava_qwen2": tf.Qwen2Config, "llava_mistral": tf.MistralConfig}


def build_config(arch: str, num_layers: int = NUM_LAYERS, **text_overrides) -> tf.PretrainedConfig:
    """The config of a tiny ``arch`` model; ``text_overrides`` change its text model (e.g. sliding_window)."""
    text = text_config_kwargs(num_layers, **text_overrides)
    if arch in _FAMILY_MODEL_CLASSES:
        return _family_config(arch, text)
    if arch in ("mistral", "llava_mistral"):
        text.setdefault("sliding_window", 64)
    if arch == "llama":
        return tf.LlamaConfig(**text)
    if arch == "mistral":
        return tf.MistralConfig(**text)
    if arch == "qwen2":
        return tf.Qwen2Config(**text)
    if arch in LLAVA_TEXT:
        vision = tf.CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            projection_dim=16,
        )
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=LLAVA_TEXT[arch](**text),
            image_token_id=IMAGE_TOKEN,
            vision_feature_layer=-1,
        )
    mrope = {"rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}}
    ids = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    if arch == "qwen2_vl":
        vision = dict(
            depth=1,
            embed_dim=16,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        return tf.Qwen2VLConfig(text_config={**text, **mrope}, vision_config=vision, **ids)
    if arch == "qwen3_vl":
        return _qwen3_vl_config(text, ids)
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=8,
            fullatt_block_indexes=[0],
        )
        return tf.Qwen2_5_VLConfig(text_config={**text, **mrope}, vision_config=vision, **ids)
    if arch in ("gemma3_text", "gemma3"):
        return _gemma3_config(arch, text)
    raise ValueError(arch)


# --- Gemma 3 ------------------------------------------------------------------------------------------

# A 16x16 image in 4x4 patches (a 4x4 grid), pooled 1x1: 16 image tokens between begin / end markers.
GEMMA_IMAGE_TOKENS = 16


def _gemma3_config(arch: str, text: dict) -> tf.PretrainedConfig:
    """Tiny Gemma 3: sliding and full layers interleaved, two rotary bases, head_dim 8."""
    text = dict(text)
    layers = text["num_hidden_layers"]
    text.setdefault("layer_types", [("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    text.setdefault("sliding_window", 64)
    text.setdefault("head_dim", 8)
    text.setdefault("query_pre_attn_scalar", 8)
    text_config = tf.Gemma3TextConfig(**text)
    if arch == "gemma3_text":
        return text_config
    vision = tf.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
        vision_use_head=False,  # as Gemma 3: it reads the last hidden state, not a pooled head
    )
    return tf.Gemma3Config(
        text_config=text_config,
        vision_config=vision,
        mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
        image_token_id=IMAGE_TOKEN,
        boi_token_id=VISION_START,
        eoi_token_id=VISION_END,
    )


_MODEL_CLASSES = {
    "llama": tf.LlamaForCausalLM,
    "mistral": tf.MistralForCausalLM,
    "qwen2": tf.Qwen2ForCausalLM,
    "llava": tf.LlavaForConditionalGeneration,
    "llava_qwen2": tf.LlavaForConditionalGeneration,
    "llava_mistral": tf.LlavaForConditionalGeneration,
    "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
    "gemma3_text": tf.Gemma3ForCausalLM,
    "gemma3": tf.Gemma3ForConditionalGeneration,
}


def build_model(
    arch: str,
    attn: str = "sdpa",
    num_layers: int = NUM_LAYERS,
    seed: int = 0,
    dtype=torch.float32,
    **text_overrides,
) -> torch.nn.Module:
    """A seeded tiny random model of ``arch`` in eval mode (``text_overrides``: see :func:`build_config`)."""
    config = build_config(arch, num_layers, **text_overrides)
    config._attn_implementation = attn
    for sub in ("text_config", "vision_config"):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = attn
    torch.manual_seed(seed)
    model = {**_MODEL_CLASSES, **_FAMILY_MODEL_CLASSES}[arch](config)
    # Random init puts tiny values in some norms; larger weights make skipped modules matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if name.endswith("mm_input_projection_weight"):  # Gemma 3 initialises its projector to 0
                p.normal_(0.0, 0.5)
        if arch == "gemma3":
            # Its image token is in the vocabulary: a random head would generate it, and a recompute then
            # reads the generated token as an image placeholder; EOS, which `greedy` forbids and its
            # recompute does not, likewise. A zero logit is below the best one.
            model.lm_head.weight[[IMAGE_TOKEN, EOS]] = 0.0
    return model.to(dtype).eval()


# --- Qwen3-VL: q/k norms, interleaved M-RoPE, DeepStack features added after decoder layers 0 and 1 ----


def _qwen3_vl_config(text: dict, ids: dict) -> tf.PretrainedConfig:
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True)
    vision = dict(
        depth=2,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        out_hidden_size=32,
        patch_size=2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1],
    )
    text = {**text, "head_dim": 8, "rope_parameters": rope}
    return tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _prompt_ids(arch: str, length: int, gen: torch.Generator, image_at: int) -> list[int]:
    """A prompt of ``length`` text tokens, with the architecture's image tokens after ``image_at`` of them."""
    text = torch.randint(3, IMAGE_TOKEN, (length,), generator=gen).tolist()
    if arch in _FAMILY_MODEL_CLASSES:
        image = family_image_ids(arch)
    elif arch.startswith("llava"):
        image = [IMAGE_TOKEN] * LLAVA_IMAGE_TOKENS
    elif arch in QWEN_VL_ARCHS:
        image = [VISION_START] + [IMAGE_TOKEN] * QWEN_IMAGE_TOKENS + [VISION_END]
    elif arch == "gemma3":
        image = [VISION_START] + [IMAGE_TOKEN] * GEMMA_IMAGE_TOKENS + [VISION_END]
    else:
        image = []
    return [BOS, *text[:image_at], *image, *text[image_at:]]


def make_inputs(
    arch: str, lengths=(6,), seed: int = 0, image_at: int = 2, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """A left-padded batch, a prompt per entry of ``lengths`` (text tokens), with images where relevant."""
    gen = torch.Generator().manual_seed(seed)
    rows = [_prompt_ids(arch, n, gen, image_at) for n in lengths]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        attention_mask[b, width - len(row) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    n = len(rows)
    if arch in _FAMILY_MODEL_CLASSES:
        batch.update(family_pixels(arch, n, gen, dtype))
    elif arch.startswith("llava"):
        batch["pixel_values"] = torch.randn(n, 3, 16, 16, generator=gen).to(dtype)
    elif arch in QWEN_VL_ARCHS:
        patches = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]
        batch["pixel_values"] = torch.randn(n * patches, QWEN_PATCH_DIM, generator=gen).to(dtype)
        batch["image_grid_thw"] = torch.tensor([QWEN_GRID] * n)
        batch["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int()
    elif arch == "gemma3":
        batch["pixel_values"] = torch.randn(n, 3, 16, 16, generator=gen).to(dtype)
        batch["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    return batch


def select_rows(arch: str, batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Row ``b`` of a batch from :func:`make_inputs`, with its padding removed."""
    keep = batch["attention_mask"][b].bool()
    out = {k: batch[k][b : b + 1, keep] for k in ("input_ids", "attention_mask")}
    if arch in _FAMILY_MODEL_CLASSES:
        out.update(family_select_pixels(arch, batch, b))
    elif arch.startswith("llava"):
        out["pixel_values"] = batch["pixel_values"][b : b + 1]
    elif arch in QWEN_VL_ARCHS:
        patches = QWEN_GRID[0] * QWEN_GRID[1] * QWEN_GRID[2]
        out["pixel_values"] = batch["pixel_values"][b * patches : (b + 1) * patches]
        out["image_grid_thw"] = batch["image_grid_thw"][b : b + 1]
        out["mm_token_type_ids"] = batch["mm_token_type_ids"][b : b + 1, keep]
    elif arch == "gemma3":
        out["pixel_values"] = batch["pixel_values"][b : b + 1]
        out["token_type_ids"] = batch["token_type_ids"][b : b + 1, keep]
    return out


def logits(model, inputs, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kw).logits


# A random model may pick an image placeholder as its next token, which a full recompute would then read as
# an image without pixels; greedy decoding here never picks one (nor EOS, as min_new_tokens asks).
NEVER_GENERATED = (IMAGE_TOKEN, VIDEO_TOKEN)


def greedy(model, inputs, steps: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` forced to ``steps`` tokens: (new tokens (B, steps), logits (B, steps, V))."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            suppress_tokens=list(NEVER_GENERATED),
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    return new, torch.stack(out.logits, dim=1)


def greedy_without_cache(model, inputs, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full recompute of the whole sequence for every new token."""
    inputs = dict(inputs)
    tokens, step_logits = [], []
    for _ in range(steps):
        with torch.no_grad():
            last = model(**inputs, use_cache=False).logits[:, -1]
        allowed = last.index_fill(-1, torch.tensor([EOS, *NEVER_GENERATED]), float("-inf"))
        nxt = allowed.argmax(-1, keepdim=True)
        tokens.append(nxt)
        step_logits.append(last)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                mm = inputs[key]
                inputs[key] = torch.cat([mm, torch.zeros_like(nxt, dtype=mm.dtype)], dim=1)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


def assert_cached_equals_recompute(model, inputs, steps: int, atol: float = 1e-5) -> None:
    """Cached greedy generation gives the tokens and logits of recomputing the whole sequence per token."""
    tokens, step_logits = greedy(model, inputs, steps)
    ref_tokens, ref_logits = greedy_without_cache(model, inputs, steps)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(step_logits, ref_logits, rtol=0, atol=atol)


def assert_batch_equals_rows(model, arch: str, batch, steps: int, atol: float = 1e-4, after_row=None):
    """Greedy generation of a padded batch equals each row generated alone; returns (tokens, logits) of
    the batch. ``after_row(b)`` runs after row ``b``'s own generation (to check per-row state)."""
    tokens, step_logits = greedy(model, batch, steps)
    for b in range(batch["input_ids"].shape[0]):
        one_tokens, one_logits = greedy(model, select_rows(arch, batch, b), steps)
        if after_row is not None:
            after_row(b)
        assert torch.equal(tokens[b], one_tokens[0])
        torch.testing.assert_close(step_logits[b], one_logits[0], rtol=0, atol=atol)
    return tokens, step_logits


def eager_copy(model):
    """A copy of the stock model with eager attention (its masks are explicit 4-D tensors)."""
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    ref.config.get_text_config(decoder=True)._attn_implementation = "eager"
    return ref


def masked_reference(model, inputs, blocked_from: int, blocked: torch.Tensor) -> torch.Tensor:
    """Logits of the stock eager model in which, from layer ``blocked_from`` on, no query may attend to
    the ``blocked`` (B, T) positions: what withdrawing them means for every remaining token."""
    ref = eager_copy(model)

    def pre(module, args, kwargs):
        mask = kwargs["attention_mask"]  # eager: (B, 1, T, T) additive
        kwargs["attention_mask"] = mask.masked_fill(blocked[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, kwargs

    for layer in get_layers(ref)[blocked_from:]:
        layer.register_forward_pre_hook(pre, with_kwargs=True)
    return logits(ref, inputs)


def zero_out(model, layer: int, module: str) -> torch.nn.Module:
    """The reference semantics of a skip: a copy of the model whose o_proj / down_proj outputs zero."""
    ref = copy.deepcopy(model)
    layer_mod = get_layers(ref)[layer]
    proj = layer_mod.self_attn.o_proj if module == "attention" else layer_mod.mlp.down_proj
    with torch.no_grad():
        proj.weight.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    return ref


def build_eas(arch: str, skip=(1, 2), seed: int = 0, dtype=torch.float32, **cfg) -> skipvlm.EASModel:
    """An EAS model on a tiny ``arch`` model with ``skip`` attentions skipped (fresh, identity adapters)."""
    config = skipvlm.EASConfig(skip_attention=list(skip), **cfg)
    return skipvlm.get_eas_model(build_model(arch, seed=seed, dtype=dtype), config)


def randomize_adapters(model: skipvlm.EASModel, seed: int = 1, std: float = 0.2) -> skipvlm.EASModel:
    """Non-zero adapters (a fresh one is the identity, which would make comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture(params=ALL_ARCHS)
def arch(request) -> str:
    return request.param


# --- a tiny multimodal world: a toy LLaVA checkpoint with its processor, and colour questions ----------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
TOY_WORDS = ["user", "assistant", ":", "what", "color", "is", "the", "square", "?", "red", "green", "blue"]


def colour_examples(n: int, seed: int = 0, image_dir=None) -> list:
    """``n`` 'what color is the square?' examples with solid-colour 16x16 images (saved if ``image_dir``)."""
    import random

    from PIL import Image

    from skipvlm.data import ChatExample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = rng.choice(sorted(COLOURS))
        image = Image.new("RGB", (16, 16), COLOURS[name])
        if image_dir is not None:
            path = image_dir / f"{seed}_{i}.png"
            image.save(path)
            image = path
        out.append(
            ChatExample("what color is the square?", name, image, choices=sorted(COLOURS), id=f"{seed}-{i}")
        )
    return out


def toy_parts(num_layers: int = 4):
    """(model, processor) of a tiny random toy LLaVA over :data:`TOY_WORDS`."""
    from skipvlm import toy

    tokenizer = toy.build_tokenizer(TOY_WORDS)
    config = toy.ToyConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=num_layers,
        vision_hidden=16,
        vision_layers=1,
        image_size=16,
        patch_size=4,
    )
    return toy.build_toy_model(tokenizer, config), toy.build_processor(tokenizer, config)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    """A saved toy checkpoint folder (model + processor) and JSONL train / held-out / test files."""
    import json

    from skipvlm import toy

    root = tmp_path_factory.mktemp("toy")
    model, processor = toy_parts()
    toy.save_toy(model, processor, root / "model")
    images = root / "images"
    images.mkdir()
    for split, n, seed in (("train", 16, 0), ("heldout", 8, 1), ("test", 6, 2)):
        with (root / f"{split}.jsonl").open("w") as f:
            for ex in colour_examples(n, seed, images):
                row = {
                    "id": ex.id,
                    "prompt": ex.prompt,
                    "answer": ex.answer,
                    "image": f"images/{ex.image.name}",
                }
                f.write(json.dumps(row) + "\n")
    return root


# --- issue 17 families: Qwen3, Mistral 3, InternVL, LLaVA-NeXT / OneVision, Idefics3 / SmolVLM ---------
#
# Kept apart from ALL_ARCHS so the default suite stays fast; tests/test_families.py runs every invariant
# of the parity suite on each of them. Image placeholders are the shared IMAGE_TOKEN; the text tokens
# around an image (Pixtral's [IMG_BREAK] / [IMG_END], InternVL's <img> / </img>, Idefics3's
# <fake_token_around_image>) are VISION_START / VISION_END.

FAMILY_TEXT_ARCHS = ("qwen3",)
FAMILY_VLM_ARCHS = (
    "mistral3",
    "internvl",
    "internvl_qwen3",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
)
FAMILY_ARCHS = FAMILY_TEXT_ARCHS + FAMILY_VLM_ARCHS
# Llama text models where the default is Qwen2: the families' stock-checkpoint export (Llama's mlp_bias).
FAMILY_LLAMA_VARIANTS = ("internvl_llama", "llava_onevision_llama")

# Any-resolution: 8x8 tiles of 4x4 patches (4 features each) on a 16x16 image in a 2x2 grid. The model
# appends a newline feature to each of the grid's 4 feature rows: 4 (base) + 16 (grid) + 4 = 24.
ANYRES_TILES, ANYRES_IMAGE_TOKENS = 5, 24
# InternVL: 2 tiles of 16x16 px in 4x4 patches, pixel-shuffled 2x2: 4 tokens each.
INTERNVL_TILES, INTERNVL_IMAGE_TOKENS = 2, 8
# Idefics3 / SmolVLM: 2 images of 16x16 px in 4x4 patches, pixel-shuffled 2x2: 4 tokens each.
IDEFICS3_TILES, IDEFICS3_TILE_TOKENS = 2, 4
# Mistral 3: a 16x24 image (h x w) in 4x4 patches (4 rows x 6 columns) merged 2x2: 2 rows of 3 tokens,
# each row closed by [IMG_BREAK], the last by [IMG_END].
MISTRAL3_IMAGE_HW, MISTRAL3_ROWS, MISTRAL3_COLS = (16, 24), 2, 3


def _family_config(arch: str, text: dict) -> tf.PretrainedConfig:
    if arch == "qwen3":
        return tf.Qwen3Config(**text, head_dim=8)
    if arch == "mistral3":
        vision = tf.PixtralVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
            image_size=32, patch_size=4,
        )  # fmt: skip
        return tf.Mistral3Config(
            vision_config=vision,
            text_config=tf.MistralConfig(**text, sliding_window=64),
            image_token_index=IMAGE_TOKEN,
            spatial_merge_size=2,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if arch.startswith("internvl"):
        vision = tf.InternVLVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=4,
        )  # fmt: skip
        text_config = {
            "internvl": tf.Qwen2Config,
            "internvl_qwen3": lambda **kw: tf.Qwen3Config(**kw, head_dim=8),
            "internvl_llama": tf.LlamaConfig,
        }[arch](**text)
        return tf.InternVLConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_id=IMAGE_TOKEN,
            image_seq_length=INTERNVL_IMAGE_TOKENS // INTERNVL_TILES,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if arch in ("llava_next", "llava_onevision", "llava_onevision_llama"):
        vision = tf.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4, projection_dim=16,
        )  # fmt: skip
        if arch == "llava_next":
            return tf.LlavaNextConfig(
                vision_config=vision,
                text_config=tf.LlamaConfig(**text),
                image_token_index=IMAGE_TOKEN,
                image_grid_pinpoints=[[16, 16], [8, 16], [16, 8]],
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
            )
        siglip = tf.SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=8, patch_size=4,
        )  # fmt: skip
        return tf.LlavaOnevisionConfig(
            vision_config=siglip,
            text_config=(tf.LlamaConfig if arch.endswith("llama") else tf.Qwen2Config)(**text),
            image_token_index=IMAGE_TOKEN,
            video_token_index=VIDEO_TOKEN,
            image_grid_pinpoints=[[16, 16], [8, 16], [16, 8]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if arch in ("idefics3", "smolvlm"):
        cls, vision_cls = (
            (tf.Idefics3Config, tf.Idefics3VisionConfig)
            if arch == "idefics3"
            else (tf.SmolVLMConfig, tf.SmolVLMVisionConfig)
        )
        vision = vision_cls(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=4,
        )  # fmt: skip
        return cls(
            vision_config=vision,
            text_config=tf.LlamaConfig(**text).to_dict(),
            image_token_id=IMAGE_TOKEN,
            scale_factor=2,
            tie_word_embeddings=False,
        )
    raise ValueError(arch)


_FAMILY_MODEL_CLASSES = {
    "qwen3": tf.Qwen3ForCausalLM,
    "mistral3": tf.Mistral3ForConditionalGeneration,
    "internvl": tf.InternVLForConditionalGeneration,
    "internvl_qwen3": tf.InternVLForConditionalGeneration,
    "internvl_llama": tf.InternVLForConditionalGeneration,
    "llava_next": tf.LlavaNextForConditionalGeneration,
    "llava_onevision": tf.LlavaOnevisionForConditionalGeneration,
    "llava_onevision_llama": tf.LlavaOnevisionForConditionalGeneration,
    "idefics3": tf.Idefics3ForConditionalGeneration,
    "smolvlm": tf.SmolVLMForConditionalGeneration,
}


def family_image_ids(arch: str) -> list[int]:
    """The placeholder run a processor of ``arch`` writes for one image, separators included."""
    if arch == "mistral3":
        row = [IMAGE_TOKEN] * MISTRAL3_COLS
        rows = [[*row, VISION_START] for _ in range(MISTRAL3_ROWS)]
        rows[-1][-1] = VISION_END
        return [t for r in rows for t in r]
    if arch.startswith("internvl"):
        return [VISION_START, *[IMAGE_TOKEN] * INTERNVL_IMAGE_TOKENS, VISION_END]
    if arch.startswith("llava"):
        return [IMAGE_TOKEN] * ANYRES_IMAGE_TOKENS
    if arch in ("idefics3", "smolvlm"):
        out = [VISION_START]
        for _ in range(IDEFICS3_TILES):
            out += [*[IMAGE_TOKEN] * IDEFICS3_TILE_TOKENS, VISION_START]
        return out
    return []


def family_pixels(arch: str, n: int, gen: torch.Generator, dtype) -> dict[str, torch.Tensor]:
    """The image inputs of ``n`` prompts of ``arch`` (one image each)."""
    if arch == "mistral3":
        h, w = MISTRAL3_IMAGE_HW
        return {
            "pixel_values": torch.randn(n, 3, h, w, generator=gen).to(dtype),
            "image_sizes": torch.tensor([[h, w]] * n),
        }
    if arch.startswith("internvl"):
        return {"pixel_values": torch.randn(n * INTERNVL_TILES, 3, 16, 16, generator=gen).to(dtype)}
    if arch.startswith("llava"):
        return {
            "pixel_values": torch.randn(n, ANYRES_TILES, 3, 8, 8, generator=gen).to(dtype),
            "image_sizes": torch.tensor([[16, 16]] * n),
        }
    if arch in ("idefics3", "smolvlm"):
        return {
            "pixel_values": torch.randn(n, IDEFICS3_TILES, 3, 16, 16, generator=gen).to(dtype),
            "pixel_attention_mask": torch.ones(n, IDEFICS3_TILES, 16, 16, dtype=torch.bool),
        }
    return {}


def family_select_pixels(arch: str, batch: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """The image inputs of row ``b`` of a batch from :func:`make_inputs`."""
    if arch.startswith("internvl"):
        return {"pixel_values": batch["pixel_values"][b * INTERNVL_TILES : (b + 1) * INTERNVL_TILES]}
    keys = ("pixel_values", "image_sizes", "pixel_attention_mask")
    return {k: batch[k][b : b + 1] for k in keys if k in batch}
