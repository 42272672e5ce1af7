"""Gemma 3 specifics the layer loop honours: sandwich norms, interleaved sliding / full layers with one
rotary table each, the scaled embedding, and the bidirectional attention over each image's tokens."""

from __future__ import annotations

import pytest
import torch

import skipvlm
from skipvlm.arch import arch_facts, get_decoder, get_layers
from skipvlm.compat import DummyLayer, output_cache

from conftest import (
    IMAGE_TOKEN,
    assert_batch_equals_rows,
    assert_cached_equals_recompute,
    build_eas,
    build_model,
    logits,
    make_inputs,
    randomize_adapters,
    zero_out,
)

WINDOW = 4  # shorter than every prompt, so the sliding layers' masks and caches are exercised


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3"])
@pytest.mark.parametrize("layer", [0, 1])  # a sliding layer, a full layer
def test_skip_equals_zeroed_projection_with_a_short_sliding_window(arch, attn, layer):
    model = build_model(arch, attn=attn, sliding_window=WINDOW)
    assert arch_facts(model).layer_types[layer] == ("sliding_attention", "full_attention")[layer]
    inputs = make_inputs(arch, lengths=(7, 3))
    for module, plan in (
        ("attention", skipvlm.Plan(skip_attention=[layer])),
        ("mlp", skipvlm.Plan(skip_mlp=[layer])),
    ):
        reference = logits(zero_out(model, layer, module), inputs)
        planned = skipvlm.apply_plan(build_model(arch, attn=attn, sliding_window=WINDOW), plan)
        torch.testing.assert_close(logits(planned, inputs), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3"])
def test_generation_with_a_short_sliding_window_is_cached_exactly_and_batches_like_rows(arch):
    model = build_model(arch, sliding_window=WINDOW)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0, 3]))
    batch = make_inputs(arch, lengths=(7, 3, 5), seed=1)
    assert_cached_equals_recompute(model, make_inputs(arch, lengths=(6,)), steps=5)
    assert_batch_equals_rows(model, arch, batch, steps=5)
    with torch.no_grad():
        cache = output_cache(model(**batch, use_cache=True))
    assert [isinstance(layer, DummyLayer) for layer in cache.layers] == [True, False, False, True]


def test_each_layer_type_runs_with_its_own_rotary_table():
    model = build_model("gemma3_text")
    text = model.config
    assert (
        text.rope_parameters["sliding_attention"]["rope_theta"]
        != text.rope_parameters["full_attention"]["rope_theta"]
    )
    seen = {}
    for i, layer in enumerate(get_layers(model)):

        def grab(module, args, kwargs, i=i):
            seen[i] = kwargs["position_embeddings"]

        layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    inputs = make_inputs("gemma3_text", lengths=(6,))
    logits(model, inputs)
    stock = dict(seen)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_mlp=[0]))
    logits(model, inputs)
    assert not torch.equal(stock[0][0], stock[1][0])  # local and global tables differ
    for i in range(4):
        for ours, theirs in zip(seen[i], stock[i], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_the_scaled_embedding_is_the_stock_module():
    model = skipvlm.apply_plan(build_model("gemma3_text"), skipvlm.Plan(skip_attention=[1]))
    ids = torch.tensor([[5, 6]])
    embed = get_decoder(model).embed_tokens
    torch.testing.assert_close(embed(ids), embed.weight[ids] * 32**0.5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_image_tokens_attend_within_their_image_as_the_stock_model(attn):
    model = build_model("gemma3", attn=attn)
    inputs = make_inputs("gemma3", lengths=(6, 3))
    assert torch.equal(inputs["token_type_ids"], (inputs["input_ids"] == IMAGE_TOKEN).long())
    stock = logits(model, inputs)
    causal = logits(model, {k: v for k, v in inputs.items() if k != "token_type_ids"})
    assert (stock - causal).abs().max() > 1e-3  # the bidirectional blocks matter here
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
    get_decoder(model).plan = skipvlm.Plan()  # the runtime's own loop and masks, nothing skipped
    torch.testing.assert_close(logits(model, inputs), stock, rtol=0, atol=1e-6)


def test_text_only_gemma3_config_with_bidirectional_attention_is_refused():
    model = build_model("gemma3_text", use_bidirectional_attention=True)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        logits(model, make_inputs("gemma3_text"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_skip_equals_the_zeroed_stock_model_in_that_precision(dtype):
    """Stock Gemma 3 itself moves by ~0.08 (bf16) from fp32 here, so the skip is pinned against the stock
    model in the same precision."""
    inputs = make_inputs("gemma3", lengths=(6, 3), dtype=dtype)
    reference = zero_out(zero_out(build_model("gemma3", dtype=dtype), 0, "attention"), 2, "attention")
    model = skipvlm.apply_plan(build_model("gemma3", dtype=dtype), skipvlm.Plan(skip_attention=[0, 2]))
    out = logits(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(reference, inputs), rtol=0, atol=0)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_bf16_replace_pia_merges_in_its_dtype_and_tracks_the_unmerged_model():
    model = randomize_adapters(build_eas("gemma3_text", dtype=torch.bfloat16))
    batch = make_inputs("gemma3_text", lengths=(6, 3))
    model.calibrate([batch], progress=False)
    model.adapters.use_calibration = True
    forced = logits(model, batch).float()
    skipped = skipvlm.apply_plan(
        build_model("gemma3_text", dtype=torch.bfloat16), skipvlm.Plan(skip_attention=[1, 2])
    )
    effect = (forced - logits(skipped, batch).float()).abs().max()
    merged = model.merge_and_unload("static")
    layer = get_layers(merged)[1]
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert torch.equal(layer.pre_feedforward_layernorm.weight, torch.zeros(32, dtype=torch.bfloat16))
    error = (logits(merged, batch).float() - forced).abs().max()
    assert error < 0.05 < effect / 5  # bf16 rounding (observed 0.026) well below the adapters' effect (0.87)
