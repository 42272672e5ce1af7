"""The parity suite on the families of issue 17: Qwen3, Mistral 3, InternVL (Qwen2 / Qwen3 text), LLaVA-NeXT,
LLaVA-OneVision, Idefics3 and SmolVLM.

Each test runs the invariant the default suite pins on the first six architectures (its function, called
with a tiny seeded model of the family from ``conftest``), so a family is held to the same numbers: plan
parity with the zeroed projection, nothing executed in skipped modules, no KV cache for skipped layers,
cached == uncached, left-padded batch == one by one, EAS adapters, static and per-example merge,
export or its refusal, and VTW / FastV / DyVTE on the visual tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import skipvlm
import test_compat as compat_tests
import test_dyvte as dyvte_tests
import test_eas as eas_tests
import test_merge as merge_tests
import test_runtime as runtime_tests
import test_tokens as token_tests
from skipvlm.arch import arch_facts, get_decoder, get_layers, visual_token_mask

from conftest import (
    ANYRES_IMAGE_TOKENS,
    ANYRES_TILES,
    FAMILY_ARCHS,
    FAMILY_LLAMA_VARIANTS,
    FAMILY_VLM_ARCHS,
    IMAGE_TOKEN,
    NUM_LAYERS,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    build_config,
    build_model,
    logits,
    make_inputs,
    masked_reference,
)

ATTNS = ("sdpa", "eager")

# arch: (decoder path, text model type, projector path, image token id, video token id)
EXPECTED = {
    "qwen3": ("model", "qwen3", None, None, None),
    "mistral3": ("model.language_model", "mistral", "model.multi_modal_projector", IMAGE_TOKEN, None),
    "internvl": ("model.language_model", "qwen2", "model.multi_modal_projector", IMAGE_TOKEN, None),
    "internvl_qwen3": ("model.language_model", "qwen3", "model.multi_modal_projector", IMAGE_TOKEN, None),
    "llava_next": ("model.language_model", "llama", "model.multi_modal_projector", IMAGE_TOKEN, None),
    "llava_onevision": (
        "model.language_model",
        "qwen2",
        "model.multi_modal_projector",
        IMAGE_TOKEN,
        VIDEO_TOKEN,
    ),
    "idefics3": ("model.text_model", "llama", "model.connector", IMAGE_TOKEN, None),
    "smolvlm": ("model.text_model", "llama", "model.connector", IMAGE_TOKEN, None),
}

# A stock checkpoint holds the merged replace-PIA only where the text config has `mlp_bias` (Llama).
EXPORTS = ("llava_next", "idefics3", "smolvlm", *FAMILY_LLAMA_VARIANTS)

# FastV: a ratio R whose kept count (1 - R) * visual ends in .5 (half up keeps one more); dropped per row.
HALF_RATIO = {
    "mistral3": (0.25, 1),  # 0.75 x 6 = 4.5 -> keep 5
    "internvl": (0.4375, 3),  # 0.5625 x 8 = 4.5 -> keep 5
    "internvl_qwen3": (0.4375, 3),
    "llava_next": (0.5625, 13),  # 0.4375 x 24 = 10.5 -> keep 11
    "llava_onevision": (0.5625, 13),
    "idefics3": (0.4375, 3),
    "smolvlm": (0.4375, 3),
}


# --- facts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_facts_from_config_alone(arch):
    facts = arch_facts(build_config(arch))
    assert (
        facts.decoder_path,
        facts.text_model_type,
        facts.projector_path,
        facts.image_token_id,
        facts.video_token_id,
    ) == EXPECTED[arch]
    assert facts.rope == "default" and facts.num_layers == NUM_LAYERS
    assert (facts.hidden_size, facts.intermediate_size, facts.head_dim) == (32, 64, 8)
    assert (facts.num_attention_heads, facts.num_key_value_heads, facts.vocab_size) == (4, 2, 128)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_layers_projector_and_model_class_resolve(arch):
    model = build_model(arch)
    facts = arch_facts(model)
    decoder = get_decoder(model)
    assert {"layers", "norm", "rotary_emb", "embed_tokens"} <= set(dict(decoder.named_children()))
    assert len(get_layers(model)) == NUM_LAYERS
    if facts.projector_path is not None:
        assert sum(p.numel() for p in model.get_submodule(facts.projector_path).parameters()) > 0
    assert skipvlm.arch.model_class(model.config) is type(model)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_visual_token_mask_covers_every_image_feature(arch):
    """The placeholders the model fills with image features (every any-resolution tile and the newline
    features it inserts) are exactly the mask's positions: the model's own placeholder mask and its
    feature count agree with it, and the separators around the image stay text."""
    model = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    mask = visual_token_mask(inputs["input_ids"], arch_facts(model))
    inner = model.model
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        features = inner.get_image_features(**pixels)
    features = getattr(features, "pooler_output", features)
    if isinstance(features, (list, tuple)):  # one (tokens, C) tensor per image
        features = torch.cat([f.reshape(-1, embeds.shape[-1]) for f in features])
    features = features.reshape(-1, embeds.shape[-1])
    assert features.shape[0] == int(mask.sum())
    if hasattr(inner, "get_placeholder_mask"):
        ids = inputs["input_ids"]
        placeholder = inner.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features)
        placeholder = placeholder[0] if isinstance(placeholder, tuple) else placeholder
        assert torch.equal(placeholder[..., 0], mask)
    else:  # Idefics3 / SmolVLM: the positions its merger writes the features to
        merged = inner.inputs_merger(inputs["input_ids"], embeds, features)
        assert torch.equal((merged != embeds).any(-1), mask)
    separators = torch.isin(inputs["input_ids"], torch.tensor([VISION_START, VISION_END]))
    assert not (mask & separators).any()  # [IMG_BREAK], <img>, <fake_token_around_image> stay text
    assert mask.sum(1).tolist() == [features.shape[0] // 2] * 2  # each prompt holds its whole image


def test_unsupported_architectures_list_the_new_families():
    config = tf.GPT2Config(n_layer=2, n_embd=16, n_head=2)
    with pytest.raises(skipvlm.UnsupportedModelError) as err:
        arch_facts(config)
    for name in (
        "Qwen3ForCausalLM",
        "Mistral3ForConditionalGeneration",
        "InternVLForConditionalGeneration",
        "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration",
        "Idefics3ForConditionalGeneration",
        "SmolVLMForConditionalGeneration",
    ):
        assert name in str(err.value)
    gpt2_inside = tf.InternVLConfig(text_config=tf.GPT2Config(n_layer=2).to_dict())
    with pytest.raises(skipvlm.UnsupportedModelError, match=r"'internvl' with a 'gpt2' text model"):
        arch_facts(gpt2_inside)


# --- skip runtime -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_empty_plan_loop_equals_stock_exactly(arch, attn):
    runtime_tests.test_empty_plan_loop_equals_stock_exactly(arch, attn)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_skipped_attention_equals_zero_o_proj(arch, attn, layer):
    runtime_tests.test_skipped_attention_equals_zero_o_proj(arch, attn, layer)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_skipped_mlp_equals_zero_down_proj(arch):
    runtime_tests.test_skipped_mlp_equals_zero_down_proj(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_skipped_modules_execute_nothing(arch, monkeypatch):
    runtime_tests.test_skipped_modules_execute_nothing(arch, monkeypatch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_skipped_layers_hold_no_kv_cache(arch):
    runtime_tests.test_skipped_layers_hold_no_kv_cache(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_cached_generation_equals_full_recompute(arch):
    runtime_tests.test_cached_generation_equals_full_recompute(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_generate_under_a_plan_uses_the_cache(arch):
    compat_tests.test_generate_under_a_plan_uses_the_cache(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_left_padded_batch_equals_one_by_one(arch):
    runtime_tests.test_left_padded_batch_equals_one_by_one(arch)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_image_anywhere_in_the_prompt(arch):
    runtime_tests.test_image_anywhere_in_the_prompt(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_current_plan_and_restore(arch):
    runtime_tests.test_current_plan_and_restore(arch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_half_precision_runs_and_tracks_fp32(arch, dtype):
    runtime_tests.test_half_precision_runs_and_tracks_fp32(arch, dtype)


# --- EAS adapters and their merges -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_fresh_eas_model_equals_the_base_and_the_plain_skip(arch):
    base = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(base, inputs)
    model = skipvlm.get_eas_model(base, skipvlm.EASConfig())
    assert len(model.adapters.adapt) == NUM_LAYERS and len(model.adapters.replace) == 0
    # Not bit-exact as in test_eas: MKL's CPU matmuls may round differently with the buffers' alignment,
    # which the adapters' allocations shift (seen on OneVision's projector, before any decoder layer).
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-6)
    eas_tests.test_fresh_model_with_skips_equals_plain_skip_plus_identity_adapter(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_eas_padding_never_counts_batch_equals_one_by_one(arch):
    eas_tests.test_padding_never_counts_batch_equals_one_by_one(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_eas_save_and_load_round_trip_exactly(arch, tmp_path):
    eas_tests.test_save_and_load_round_trip_exactly(arch, tmp_path)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_per_example_merge_equals_unmerged(arch):
    merge_tests.test_per_example_merge_equals_unmerged(arch)


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_static_merge_equals_unmerged_with_calibration_means(arch):
    merge_tests.test_static_merge_equals_unmerged_with_calibration_means(arch)


@pytest.mark.parametrize("arch", EXPORTS)
def test_exported_checkpoint_loads_in_stock_transformers_and_equals_static(arch, tmp_path):
    merge_tests.test_exported_checkpoint_loads_in_stock_transformers_and_equals_static(arch, tmp_path)


@pytest.mark.parametrize("arch", [a for a in FAMILY_ARCHS if a not in EXPORTS])
def test_export_is_refused_where_the_text_model_has_no_mlp_bias(arch, tmp_path):
    model, _ = merge_tests.trained(arch)
    text_type, model_type = EXPECTED[arch][1], arch_facts(model).model_type
    with pytest.raises(ValueError, match=rf"stock {text_type} checkpoint \({model_type}\) has no MLP biases"):
        model.export_merged(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


# --- visual-token exit -----------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_exit_at_the_last_layer_and_fastv_ratio_zero_equal_the_base(arch, attn):
    token_tests.test_exit_at_the_last_layer_and_fastv_ratio_zero_equal_the_base(arch, attn)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_text_only_prompt_passes_unchanged(arch):
    token_tests.test_text_only_prompt_passes_unchanged(arch)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_vtw_equals_blocking_visual_tokens_from_the_exit_layer(arch, attn):
    token_tests.test_vtw_equals_blocking_visual_tokens_from_the_exit_layer(arch, attn)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_vtw_batch_cache_and_image_placement(arch):
    token_tests.test_vtw_left_padded_batch_equals_one_by_one_and_cache_is_text_only(arch)
    token_tests.test_vtw_cached_generation_equals_uncached_recompute(arch)
    token_tests.test_vtw_with_the_image_anywhere(arch)


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_fastv_keeps_the_most_attended_visual_tokens(arch, attn, monkeypatch):
    monkeypatch.setitem(token_tests.HALF_RATIO, arch, HALF_RATIO[arch])
    token_tests.test_fastv_keeps_the_most_attended_visual_tokens(arch, attn)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_fastv_from_all_text_tokens(arch, monkeypatch):
    monkeypatch.setitem(token_tests.HALF_RATIO, arch, HALF_RATIO[arch])
    token_tests.test_fastv_from_all_text_tokens_keeps_what_they_attend_most(arch)
    token_tests.test_fastv_from_all_text_tokens_batches_like_one_by_one(arch)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_vtw_composes_with_skips_adapters_and_their_merge(arch):
    token_tests.test_vtw_composes_with_skipped_attentions(arch)
    token_tests.test_vtw_composes_with_eas_adapters_and_their_merge(arch)


@pytest.mark.parametrize("arch", FAMILY_VLM_ARCHS)
def test_dyvte_each_example_exits_at_its_own_layer(arch, tmp_path):
    dyvte_tests.test_each_example_exits_at_its_own_layer_and_batches_like_one_by_one(arch, tmp_path)


# --- presets at real sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "billions", "layers", "visual_tokens"),
    [
        ("qwen3-8b", 8.19, 36, 0),  # model card: 8.2B
        ("llava-v1.6-mistral-7b", 7.57, 32, 3 * 576 + 48),  # 7.57B
        ("llava-onevision-qwen2-7b", 8.03, 28, 3 * 729 + 54),  # 8.03B
        ("internvl3-8b", 7.94, 28, 256),  # 7.94B; a 448 px image is one tile
        ("smolvlm-2b", 2.25, 24, 3 * 729 // 9),  # 2.25B
        ("mistral-small-3.1-24b", 24.01, 40, 1024 // 4),  # 24B
    ],
)
def test_family_presets_have_the_published_sizes_on_the_meta_device(name, billions, layers, visual_tokens):
    """Parameter counts of the public checkpoints; a 448 px image (1024 patches of 14 px) gives the
    visual tokens of the family's rule: tiles of the tower's size plus a base / thumbnail tile (and
    LLaVA-NeXT's row newlines), Pixtral's 2x2 merge of the image's own patches."""
    from skipvlm import presets
    from skipvlm.cost import count_macs

    model = presets.build(name)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
    assert arch_facts(model).num_layers == layers
    report = count_macs(model.config, 4096)
    assert report.visual_tokens == visual_tokens
    assert (report.vision > 0) == (visual_tokens > 0) and (report.projector > 0) == (visual_tokens > 0)


@pytest.mark.parametrize("arch", ["llava_next", "llava_onevision"])
def test_anyres_non_square_image_withdraws_every_tile_and_newline(arch):
    """A 16x10 image picks a 2x1 grid whose padding the model cuts before adding row newlines; the
    placeholders the processor writes for it are all withdrawn by VTW, exactly as masking them."""
    model = build_model(arch)
    gen = torch.Generator().manual_seed(0)
    pixels = {"pixel_values": torch.randn(1, ANYRES_TILES, 3, 8, 8, generator=gen)}
    pixels["image_sizes"] = torch.tensor([[16, 10]])
    with torch.no_grad():
        features = model.model.get_image_features(**pixels)
    features = getattr(features, "pooler_output", features)
    count = sum(f.shape[0] for f in features)
    assert 4 < count < ANYRES_IMAGE_TOKENS  # the base tile, a cut grid and its newlines
    ids = torch.tensor([[1, 5, 6, *[IMAGE_TOKEN] * count, 7, 8, 9]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels}
    text = ids != IMAGE_TOKEN
    reference = masked_reference(model, inputs, 2, ~text)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
    torch.testing.assert_close(logits(model, inputs)[text], reference[text], rtol=0, atol=1e-5)
