"""Analytic MACs (METHODS §5) against matmuls counted on a real forward, and the paper's anchor."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.cost import count_macs

from conftest import build_model, make_inputs


def counted_linear_macs(model, inputs) -> int:
    """MACs of every nn.Linear / Conv2d a forward runs, counted from the actual call shapes."""
    total = 0

    def linear(module, args, _out):
        nonlocal total
        total += args[0].numel() // module.in_features * module.in_features * module.out_features

    def conv(module, args, out):
        nonlocal total
        k = math.prod(module.kernel_size) * module.in_channels
        total += out.numel() * k

    hooks = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [
        m.register_forward_hook(conv)
        for m in model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))
    ]
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    for h in hooks:
        h.remove()
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llava", "qwen2_vl"])
@pytest.mark.parametrize("plan", [skipvlm.Plan(), skipvlm.Plan(skip_attention=[0, 2], skip_mlp=[3])])
def test_analytic_counts_match_counted_matmuls(arch, plan):
    model = skipvlm.apply_plan(build_model(arch), plan)
    inputs = make_inputs(arch, lengths=(6,))
    n = inputs["input_ids"].shape[1]
    report = count_macs(model, n, plan, image_patches=16)
    sdp = sum(layer["attention_sdp"] for layer in report.layers)
    vision_sdp = 0
    if arch == "llava":
        v = model.config.vision_config
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        vision_sdp = v.num_hidden_layers * 2 * tokens * tokens * v.hidden_size
    if arch == "qwen2_vl":
        v = model.config.vision_config
        vision_sdp = v.depth * 2 * 16 * 16 * v.embed_dim
    assert counted_linear_macs(model, inputs) == report.total - sdp - vision_sdp


def test_a_plan_removes_what_it_skips():
    config = build_model("llama").config
    base, skipped = count_macs(config, 100), count_macs(config, 100, skipvlm.Plan(skip_attention=[1]))
    assert base.total - skipped.total == base.layers[1]["attention_proj"] + base.layers[1]["attention_sdp"]
    assert skipped.layers[1]["mlp"] == base.layers[1]["mlp"]


def test_llava_7b_anchor_from_the_eas_paper():
    """METHODS §5: skipping 12 MHAs at a 749-token prompt removed 12.0% of LLaVA-7B's MACs."""
    vision = tf.CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = tf.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    )
    config = tf.LlavaConfig(vision_config=vision, text_config=text)
    base = count_macs(config, 749)
    for k, paper in ((8, 8.0), (12, 12.0)):
        removed = base.total - count_macs(config, 749, skipvlm.Plan(skip_attention=list(range(k)))).total
        assert abs(100 * removed / base.total - paper) < 1.0


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(
    "plan",
    [
        skipvlm.Plan(visual_exit_layer=2),
        skipvlm.Plan(fastv_layer=1, fastv_ratio=0.5),
        skipvlm.Plan(skip_attention=[3], skip_mlp=[0], visual_exit_layer=1),
    ],
)
def test_token_exit_counts_match_the_work_the_runtime_does(arch, plan):
    test_analytic_counts_match_counted_matmuls(arch, plan)
    n = make_inputs(arch, lengths=(6,))["input_ids"].shape[1]
    report = count_macs(build_model(arch), n, plan, image_patches=16)
    visual = 16 if arch == "llava" else 4
    start = plan.visual_exit_layer or plan.fastv_layer
    dropped = visual if plan.visual_exit_layer else visual // 2
    assert [layer["tokens"] for layer in report.layers] == [n if i < start else n - dropped for i in range(4)]
    assert report.total < count_macs(build_model(arch), n, plan.skips_only(), image_patches=16).total


def test_dyvte_is_counted_at_the_exit_layer_given():
    model = build_model("llava")
    plan = skipvlm.Plan(dyvte="routers")
    assert count_macs(model, 40, plan).total == count_macs(model, 40).total
    assert (
        count_macs(model, 40, plan, exit_layer=2).total
        == count_macs(model, 40, skipvlm.Plan(visual_exit_layer=2)).total
    )
    with pytest.raises(ValueError, match="16 visual tokens do not fit in a 10-token prompt"):
        count_macs(model, 10)


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma3"])
@pytest.mark.parametrize("plan", [skipvlm.Plan(), skipvlm.Plan(skip_attention=[0, 3], skip_mlp=[1])])
def test_gemma3_analytic_counts_match_counted_matmuls(arch, plan):
    model = skipvlm.apply_plan(build_model(arch), plan)
    inputs = make_inputs(arch, lengths=(6,))
    report = count_macs(model, inputs["input_ids"].shape[1], plan)
    untracked = sum(layer["attention_sdp"] for layer in report.layers)
    if arch == "gemma3":
        v = model.config.vision_config
        patches = (v.image_size // v.patch_size) ** 2  # SigLIP: no class token
        untracked += v.num_hidden_layers * 2 * patches * patches * v.hidden_size
        untracked += report.projector  # Gemma 3's projector is a plain matmul, not an nn.Linear
        assert report.visual_tokens == 16
    assert counted_linear_macs(model, inputs) == report.total - untracked
