"""PEFT on planned models: the plan API takes a PeftModel, LoRA targets follow the plan, and a planned model
saved with save_pretrained (after a LoRA or static merge) reloads under its plan."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import skipvlm
from skipvlm.arch import get_layers
from skipvlm.data.chat import ChatCollator
from skipvlm.lora import lora_target_modules
from skipvlm.plan import CONFIG_KEY

from conftest import build_model, colour_examples, logits, make_inputs, toy_parts

PLAN = skipvlm.Plan(skip_attention=[1, 2], skip_mlp=[3])
ATOL = 1e-5


def peft(model, target_modules, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))


def lora_modules(model) -> set[str]:
    """Full names (in the unwrapped model) of the modules holding LoRA weights."""
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    return {n.removeprefix("base_model.model.") for n in names}


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_apply_current_and_use_plan_take_a_peft_model(arch):
    model = build_model(arch)
    reference = skipvlm.apply_plan(copy.deepcopy(model), PLAN)
    wrapped = peft(model, ["q_proj", "v_proj"])
    batch = make_inputs(arch, lengths=(6, 4), seed=1)

    assert skipvlm.apply_plan(wrapped, PLAN) is wrapped
    assert skipvlm.current_plan(wrapped) == PLAN == skipvlm.current_plan(wrapped.get_base_model())
    # LoRA starts as the identity (B = 0), so the wrapped model computes the planned reference
    torch.testing.assert_close(logits(wrapped, batch), logits(reference, batch), rtol=0, atol=ATOL)
    with skipvlm.use_plan(wrapped, skipvlm.Plan()):
        assert skipvlm.current_plan(wrapped) == skipvlm.Plan()
    assert skipvlm.current_plan(wrapped) == PLAN


def test_lora_targets_skip_what_the_plan_skips_and_the_vision_tower():
    model = build_model("llava")
    skipvlm.apply_plan(model, PLAN)
    pattern = lora_target_modules(model, ["q_proj", "v_proj", "gate_proj"])
    wrapped = peft(model, pattern)
    layer = "model.language_model.layers.{}.{}"
    expected = {layer.format(i, n) for i in (0, 3) for n in ("self_attn.q_proj", "self_attn.v_proj")}
    expected |= {layer.format(i, "mlp.gate_proj") for i in (0, 1, 2)}
    assert lora_modules(wrapped) == expected
    # the same names without the helper also adapt the vision tower and the skipped modules
    everything = lora_modules(peft(build_model("llava"), ["q_proj", "v_proj", "gate_proj"]))
    assert any("vision_tower" in n for n in everything) and expected < everything
    # an explicit plan overrides the one the model runs; the default follows current_plan
    assert lora_target_modules(wrapped, ["q_proj"], plan=skipvlm.Plan()) != lora_target_modules(
        model, ["q_proj"]
    )


def test_lora_targets_name_the_problem():
    model = build_model("llama")
    with pytest.raises(ValueError, match=r"no linear layer named \['qkv'\].*'q_proj'"):
        lora_target_modules(model, ["qkv"])
    everything = skipvlm.Plan(skip_attention=range(4))
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora_target_modules(model, ["q_proj"], plan=everything)


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_save_pretrained_carries_the_plan_to_load_pretrained(arch, tmp_path):
    model = skipvlm.apply_plan(build_model(arch), PLAN)
    batch = make_inputs(arch, lengths=(6, 4), seed=2)
    model.save_pretrained(tmp_path / "planned")
    assert json.loads((tmp_path / "planned" / "config.json").read_text())[CONFIG_KEY] == PLAN.to_dict()
    loaded = skipvlm.load_pretrained(tmp_path / "planned").eval()
    assert skipvlm.current_plan(loaded) == PLAN
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=ATOL)
    # back to the stock model: the config forgets the plan
    skipvlm.apply_plan(model, skipvlm.Plan())
    model.save_pretrained(tmp_path / "stock")
    assert CONFIG_KEY not in json.loads((tmp_path / "stock" / "config.json").read_text())
    assert skipvlm.current_plan(skipvlm.load_pretrained(tmp_path / "stock")) == skipvlm.Plan()


def test_peft_flow_plan_lora_train_merge_save_reload(tmp_path):
    model, processor = toy_parts()
    skipvlm.apply_plan(model, PLAN)
    wrapped = peft(model, lora_target_modules(model, ["q_proj", "v_proj", "gate_proj", "down_proj"]))
    batch = ChatCollator(processor)(colour_examples(4, seed=1))

    wrapped.train()
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = wrapped(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None for p in wrapped.parameters())  # zero_grad(set_to_none) after use
    trained = {n: p for n, p in wrapped.named_parameters() if "lora_B" in n}
    assert trained and all(p.abs().sum() > 0 for p in trained.values())  # every LoRA module learned
    wrapped.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = logits(wrapped, inputs)

    merged = wrapped.merge_and_unload()
    assert skipvlm.current_plan(merged) == PLAN
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=0, atol=ATOL)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = skipvlm.load_pretrained(tmp_path / "merged").eval()
    assert skipvlm.current_plan(reloaded) == PLAN
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    assert sum(p.numel() for p in get_layers(reloaded)[1].self_attn.parameters()) == 0  # freed
    torch.testing.assert_close(logits(reloaded, inputs), expected, rtol=0, atol=ATOL)
