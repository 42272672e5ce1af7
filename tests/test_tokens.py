"""Visual-token exit (VTW, FastV) on tiny LLaVA and Qwen2-VL models: exactness against a masked reference,
batching, caching, image placement, composition with attention skipping, and errors."""

from __future__ import annotations

import copy
from decimal import Decimal

import pytest
import torch

import skipvlm
from skipvlm.arch import get_layers
from skipvlm.compat import cache_kwargs, output_cache

from conftest import (
    IMAGE_TOKEN,
    assert_batch_equals_rows,
    assert_cached_equals_recompute,
    build_eas,
    build_model,
    eager_copy,
    greedy,
    logits,
    make_inputs,
    masked_reference,
    randomize_adapters,
    select_rows,
)

ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
ARCHS += ("gemma3",)  # bidirectional image blocks, one rotary table per layer type


def text_positions(inputs) -> torch.Tensor:
    return inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN)


# --- the identities ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_exit_at_the_last_layer_and_fastv_ratio_zero_equal_the_base(arch, attn):
    model = build_model(arch, attn=attn)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(model, inputs)
    for plan in (skipvlm.Plan(visual_exit_layer=4), skipvlm.Plan(fastv_layer=2, fastv_ratio=0.0)):
        skipvlm.apply_plan(model, plan)
        torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
        assert skipvlm.exit_layers(model) == [4, 4]


@pytest.mark.parametrize("arch", ARCHS)
def test_text_only_prompt_passes_unchanged(arch):
    model = build_model(arch)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    expected = logits(model, inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=1))
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    assert skipvlm.exit_layers(model) == [4]


# --- VTW ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_equals_blocking_visual_tokens_from_the_exit_layer(arch, attn):
    model = build_model(arch, attn=attn)
    inputs = make_inputs(arch, lengths=(6, 3))
    text = text_positions(inputs)
    reference = masked_reference(model, inputs, 2, inputs["input_ids"] == IMAGE_TOKEN)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
    out = logits(model, inputs)
    torch.testing.assert_close(out[text], reference[text], rtol=0, atol=1e-5)
    assert (out[:, -1] - logits(skipvlm.apply_plan(model, skipvlm.Plan()), inputs)[:, -1]).abs().max() > 1e-3
    assert skipvlm.current_plan(model).is_empty


@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_left_padded_batch_equals_one_by_one_and_cache_is_text_only(arch):
    model = skipvlm.apply_plan(build_model(arch), skipvlm.Plan(visual_exit_layer=2))
    batch = make_inputs(arch, lengths=(7, 3, 5), seed=1)
    greedy(model, batch, steps=1)
    assert skipvlm.exit_layers(model) == [2, 2, 2]
    assert_batch_equals_rows(model, arch, batch, steps=5)
    for b in range(3):
        row = select_rows(arch, batch, b)
        with torch.no_grad():
            cache = output_cache(model(**row, use_cache=True))
        full = row["input_ids"].shape[1]
        visual = int((row["input_ids"] == IMAGE_TOKEN).sum())
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        assert lengths == [full, full, full - visual, full - visual]


@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_cached_generation_equals_uncached_recompute(arch):
    model = skipvlm.apply_plan(build_model(arch), skipvlm.Plan(visual_exit_layer=2))
    assert_cached_equals_recompute(model, make_inputs(arch, lengths=(6, 4)), steps=6)


@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_with_the_image_anywhere(arch):
    model = build_model(arch)
    rows = [make_inputs(arch, lengths=(6,), image_at=at, seed=3) for at in (0, 3, 6)]
    for inputs in rows:
        text = text_positions(inputs)
        reference = masked_reference(model, inputs, 1, ~text)
        skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=1))
        out = logits(model, inputs)
        skipvlm.apply_plan(model, skipvlm.Plan())
        torch.testing.assert_close(out[text], reference[text], rtol=0, atol=1e-5)


def test_vtw_kv_cache_bytes_shrink():
    model = build_model("llava")
    inputs = make_inputs("llava", lengths=(6,))
    with torch.no_grad():
        full = skipvlm.kv_cache_bytes(output_cache(model(**inputs, use_cache=True)))
        skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
        exited = skipvlm.kv_cache_bytes(output_cache(model(**inputs, use_cache=True)))
    visual, total = 16, inputs["input_ids"].shape[1]
    assert exited == pytest.approx(full * (2 * total + 2 * (total - visual)) / (4 * total))


# --- FastV -------------------------------------------------------------------------------------------------


def fastv_reference(model, inputs, layer: int, ratio: float, source: str = "last") -> torch.Tensor:
    """Visual tokens dropped by FastV, from the stock model's eager attention weights at layer - 1."""
    ref = eager_copy(model)
    with torch.no_grad():
        attn = ref(**inputs, output_attentions=True).attentions[layer - 1]  # (B, H, T, T)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    if source == "last":
        received = attn[:, :, -1, :].mean(1)  # (B, T): from the last prompt token, averaged over heads
    else:  # from every real text token, averaged over those queries and the heads
        queries = inputs["attention_mask"].bool() & ~visual
        received = torch.stack([attn[b][:, queries[b]].mean((0, 1)) for b in range(attn.shape[0])])
    dropped = torch.zeros_like(visual)
    for b in range(visual.shape[0]):
        pos = visual[b].nonzero().squeeze(1)
        # half up, written independently of the implementation (Python's round() is banker's rounding)
        keep = int(Decimal(1 - ratio) * len(pos) + Decimal("0.5"))
        order = received[b, pos].argsort(descending=True)
        dropped[b, pos[order[keep:]]] = True
    return dropped


# (1 - R) x visual tokens ends in .5: 0.53125 x 16 = 8.5 (LLaVA), 0.625 x 4 = 2.5 (Qwen2-VL). Half up keeps
# 9 / 3; rounding down or to even (Python's round) would keep 8 / 2.
HALF_RATIO = {
    "llava": (0.46875, 7),
    "qwen2_vl": (0.375, 1),
    "qwen2_5_vl": (0.375, 1),
    "qwen3_vl": (0.375, 1),
    "gemma3": (0.46875, 7),
}  # arch: (R, dropped per row)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fastv_keeps_the_most_attended_visual_tokens(arch, attn):
    model = build_model(arch, attn=attn)
    inputs = make_inputs(arch, lengths=(6, 3))
    ratio, drops = HALF_RATIO[arch]
    dropped = fastv_reference(model, inputs, 2, ratio)
    assert dropped.sum(1).tolist() == [drops, drops]
    reference = masked_reference(model, inputs, 2, dropped)
    skipvlm.apply_plan(model, skipvlm.Plan(fastv_layer=2, fastv_ratio=ratio))
    out = logits(model, inputs)
    kept = text_positions(inputs)
    torch.testing.assert_close(out[kept], reference[kept], rtol=0, atol=1e-5)
    assert skipvlm.exit_layers(model) == [2, 2]
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    width = inputs["input_ids"].shape[1]
    packed = width - int(dropped[0].sum())  # row 0 is the longest
    assert [layer.keys.shape[-2] for layer in cache.layers] == [width, width, packed, packed]


@pytest.mark.parametrize("arch", ARCHS)
def test_fastv_from_all_text_tokens_keeps_what_they_attend_most(arch):
    model = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3), seed=7)
    ratio, drops = HALF_RATIO[arch]
    dropped = fastv_reference(model, inputs, 2, ratio, source="text")
    assert dropped.sum(1).tolist() == [drops, drops]
    assert not torch.equal(dropped, fastv_reference(model, inputs, 2, ratio))  # the sources disagree here
    reference = masked_reference(model, inputs, 2, dropped)
    skipvlm.apply_plan(model, skipvlm.Plan(fastv_layer=2, fastv_ratio=ratio, fastv_source="text"))
    kept = text_positions(inputs)
    torch.testing.assert_close(logits(model, inputs)[kept], reference[kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fastv_from_all_text_tokens_batches_like_one_by_one(arch):
    model = skipvlm.apply_plan(
        build_model(arch), skipvlm.Plan(fastv_layer=1, fastv_ratio=0.75, fastv_source="text")
    )
    batch = make_inputs(arch, lengths=(7, 3, 5), seed=2)
    assert_batch_equals_rows(model, arch, batch, steps=4)
    from_text = logits(model, batch)[:, -1]
    skipvlm.apply_plan(model, skipvlm.Plan(fastv_layer=1, fastv_ratio=0.75))
    assert (logits(model, batch)[:, -1] - from_text).abs().max() > 1e-4  # the two rankings differ


# --- composition -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_composes_with_skipped_attentions(arch):
    model = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in (1, 3):  # a skipped attention adds nothing: the reference zeroes its output projection
            get_layers(ref)[i].self_attn.o_proj.weight.zero_()
    text = text_positions(inputs)
    reference = masked_reference(ref, inputs, 2, ~text)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1, 3], visual_exit_layer=2))
    out = logits(model, inputs)
    torch.testing.assert_close(out[text], reference[text], rtol=0, atol=1e-5)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    assert cache.layers[1].keys is None and cache.layers[3].keys is None
    assert cache.layers[2].keys.shape[-2] == int(text.sum(1).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_vtw_composes_with_eas_adapters_and_their_merge(arch):
    model = randomize_adapters(build_eas(arch, skip=(2,)))
    model.set_plan(skipvlm.Plan(skip_attention=[2], visual_exit_layer=3))
    batch = make_inputs(arch, lengths=(6, 3), seed=4)
    tokens, step_logits = assert_batch_equals_rows(model, arch, batch, steps=4)
    # Uncached recompute, with the adapters pooling over the prompt only (as the cached run froze them).
    inputs, ref_logits = dict(batch), []
    prompt = batch["attention_mask"].bool()
    for step in range(4):
        mask = torch.cat([prompt, prompt.new_zeros(2, step)], dim=1)
        with torch.no_grad():
            ref_logits.append(model(**inputs, use_cache=False, prompt_mask=mask).logits[:, -1])
        nxt = tokens[:, step : step + 1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], nxt], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                inputs[key] = torch.cat([inputs[key], torch.zeros_like(nxt)], 1)
    torch.testing.assert_close(step_logits, torch.stack(ref_logits, 1), rtol=0, atol=1e-4)
    model.set_skip_attention([2])  # moving skips keeps the token exit
    assert model.plan.visual_exit_layer == 3
    merged = copy.deepcopy(model).merge_and_unload(mode="per_example")  # adapters folded into the FFN
    assert skipvlm.current_plan(merged).visual_exit_layer == 3
    merged_tokens, merged_logits = greedy(merged, select_rows(arch, batch, 0), steps=4)
    assert torch.equal(merged_tokens[0], tokens[0])
    torch.testing.assert_close(merged_logits[0], step_logits[0], rtol=0, atol=1e-4)


# --- errors ------------------------------------------------------------------------------------------------


def test_token_exit_needs_a_multimodal_model():
    with pytest.raises(ValueError, match="needs a multimodal model"):
        skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(visual_exit_layer=2))


def test_token_exit_needs_input_ids_and_left_padding():
    model = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(visual_exit_layer=2))
    inputs = make_inputs("llava", lengths=(6, 3))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="call the model with input_ids"):
            model.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
        right = {k: v.flip(1) if k != "pixel_values" else v for k, v in inputs.items()}
        with pytest.raises(ValueError, match="left-padded"):
            model(**right)


def test_changing_the_token_plan_mid_generation_raises():
    model = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(visual_exit_layer=2))
    inputs = make_inputs("llava")
    step = {"input_ids": inputs["input_ids"][:, :1]}
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        skipvlm.apply_plan(model, skipvlm.Plan(skip_mlp=[3]))
        with pytest.raises(ValueError, match="withdrew visual tokens"):
            model(**step, **cache_kwargs(cache), use_cache=True)
        skipvlm.apply_plan(model, skipvlm.Plan())
        cache = output_cache(model(**inputs, use_cache=True))
        skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=2))
        with pytest.raises(ValueError, match="filled without visual-token exit"):
            model(**step, **cache_kwargs(cache), use_cache=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_token_exit_tracks_fp32(dtype):
    plan = skipvlm.Plan(skip_attention=[3], visual_exit_layer=2)
    ref = logits(skipvlm.apply_plan(build_model("llava"), plan), make_inputs("llava", lengths=(6, 3)))
    model = skipvlm.apply_plan(build_model("llava", dtype=dtype), plan)
    half = logits(model, make_inputs("llava", lengths=(6, 3), dtype=dtype))
    assert half.dtype == dtype and torch.isfinite(half).all()
    # the exit moves the last logits by ~0.1; half precision stays within 0.015 of fp32 (observed 0.002)
    tolerance = 0.015
    skips_only = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(skip_attention=[3]))
    without_exit = logits(skips_only, make_inputs("llava", lengths=(6, 3)))
    assert (without_exit[:, -1] - ref[:, -1]).abs().max() > 5 * tolerance
    assert (half[:, -1].float() - ref[:, -1]).abs().max() < tolerance


def test_hidden_states_keep_their_shape_after_the_exit():
    model = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(visual_exit_layer=2))
    inputs = make_inputs("llava", lengths=(6, 3))
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states
    assert len(states) == 5 and all(s.shape == states[0].shape for s in states)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    # withdrawn positions keep the state they had when they left (the input of layer 2)
    torch.testing.assert_close(states[3][visual], states[2][visual], rtol=0, atol=0)
    assert (states[3][~visual] - states[2][~visual]).abs().max() > 1e-3
