"""Qwen3-VL's DeepStack under skipvlm's loop: the features are added after every layer that takes them,
whatever the layer's route, and only to the visual tokens still present after a token exit."""

from __future__ import annotations

import copy

import pytest
import torch

import skipvlm
from skipvlm.arch import get_layers
from skipvlm.deepstack import DeepStack, take_deepstack
from skipvlm.layout import gather_tokens, pack
from test_tokens import fastv_reference, text_positions

from conftest import IMAGE_TOKEN, assert_batch_equals_rows, build_model, logits, make_inputs, masked_reference

ARCH = "qwen3_vl"


def without_deepstack(model):
    """A copy whose DeepStack mergers output zeros: the same model with nothing added after layers 0, 1."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for merger in ref.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    return ref


def test_the_fixture_adds_deepstack_features_that_matter():
    model = build_model(ARCH)
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]
    inputs = make_inputs(ARCH, lengths=(6, 3))
    text = text_positions(inputs)
    assert (logits(model, inputs)[text] - logits(without_deepstack(model), inputs)[text]).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 1])
def test_a_skipped_layer_still_takes_its_features(attn, layer):
    """Skipping layer i whole is the stock model with its o_proj and down_proj zeroed: the features of
    layer i are still added after it."""
    model = build_model(ARCH, attn=attn)
    inputs = make_inputs(ARCH, lengths=(6, 3))
    ref = copy.deepcopy(model)
    with torch.no_grad():
        get_layers(ref)[layer].self_attn.o_proj.weight.zero_()
        get_layers(ref)[layer].mlp.down_proj.weight.zero_()
    expected = logits(ref, inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[layer], skip_mlp=[layer]))
    assert type(skipvlm.arch.get_decoder(model).routes[layer]).__name__ == "SkipLayer"
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-5)
    assert (expected - logits(without_deepstack(ref), inputs)).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_vtw_before_a_deepstack_layer_drops_its_features_with_the_tokens(attn):
    model = build_model(ARCH, attn=attn)
    inputs = make_inputs(ARCH, lengths=(6, 3))
    text = text_positions(inputs)
    reference = masked_reference(model, inputs, 1, inputs["input_ids"] == IMAGE_TOKEN)
    skipvlm.apply_plan(model, skipvlm.Plan(visual_exit_layer=1))
    torch.testing.assert_close(logits(model, inputs)[text], reference[text], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_before_a_deepstack_layer_adds_each_kept_token_its_own_feature(attn):
    """FastV from layer 1 keeps a different visual token per row of a padded batch; the features of
    layer 1 go to the kept tokens through the packed layout, as the stock model (dropped tokens masked
    out of attention from layer 1) adds them."""
    model = build_model(ARCH, attn=attn)
    inputs = make_inputs(ARCH, lengths=(6, 3), seed=5)
    dropped = fastv_reference(model, inputs, 1, 0.5)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert dropped.sum(1).tolist() == [2, 2]
    assert not torch.equal(dropped[0][visual[0]], dropped[1][visual[1]])  # each row keeps its own tokens
    reference = masked_reference(model, inputs, 1, dropped)
    skipvlm.apply_plan(model, skipvlm.Plan(fastv_layer=1, fastv_ratio=0.5))
    out = logits(model, inputs)
    text = text_positions(inputs)
    torch.testing.assert_close(out[text], reference[text], rtol=0, atol=1e-5)
    # the features after layer 1 reach the text through the kept tokens
    other = masked_reference(without_deepstack(model), inputs, 1, dropped)
    assert (other[text] - reference[text]).abs().max() > 1e-3


def test_fastv_before_a_deepstack_layer_batches_like_one_by_one():
    model = skipvlm.apply_plan(build_model(ARCH), skipvlm.Plan(fastv_layer=1, fastv_ratio=0.5))
    assert_batch_equals_rows(model, ARCH, make_inputs(ARCH, lengths=(7, 3, 5), seed=2), steps=4)


def test_packed_layout_gets_the_features_of_its_original_positions():
    """The hook on a packed layout equals the hook on the full layout, read through the layout."""
    gen = torch.Generator().manual_seed(0)
    batch, length, width = 3, 9, 5
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[0, 2:6] = visual[1, 4:8] = visual[2, 1:5] = True
    features = [torch.randn(int(visual.sum()), width, generator=gen) for _ in range(2)]
    hook = DeepStack(visual, features)
    h = torch.randn(batch, length, width, generator=gen)
    keep = torch.rand(batch, length, generator=gen) > 0.4
    keep[:, -1] = True
    index, mask = pack(keep)
    for i in (0, 1):
        full = hook.after_layer(i, h, None, None)
        packed = hook.after_layer(i, gather_tokens(h, index), index, mask)
        torch.testing.assert_close(packed[mask], gather_tokens(full, index)[mask], rtol=0, atol=0)
    assert hook.after_layer(2, h, None, None) is h  # no features for layer 2


def test_deepstack_keywords_are_taken_and_checked():
    visual = torch.tensor([[False, True, True]])
    kwargs = {"visual_pos_masks": visual, "deepstack_visual_embeds": [torch.ones(2, 4)], "use_cache": 1}
    assert isinstance(take_deepstack(kwargs), DeepStack) and kwargs == {"use_cache": 1}
    assert take_deepstack({"visual_pos_masks": None, "deepstack_visual_embeds": None}) is None
    with pytest.raises(ValueError, match="hold 3 visual tokens but visual_pos_masks marks 2"):
        take_deepstack({"visual_pos_masks": visual, "deepstack_visual_embeds": [torch.ones(3, 4)]})
    with pytest.raises(ValueError, match="without visual_pos_masks"):
        take_deepstack({"deepstack_visual_embeds": [torch.ones(2, 4)]})
