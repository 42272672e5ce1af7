"""The skip runtime executes a plan for real: numerics, no work, no KV cache, generation, restore."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import skipvlm
from skipvlm.arch import get_decoder, get_layers
from skipvlm.compat import DummyLayer, cache_kwargs, output_cache
from skipvlm.runtime import SkipDecoder

from conftest import (
    ALL_ARCHS,
    VLM_ARCHS,
    assert_batch_equals_rows,
    assert_cached_equals_recompute,
    build_model,
    greedy,
    greedy_without_cache,
    logits,
    make_inputs,
    zero_out,
)

# --- numerics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_empty_plan_loop_equals_stock_exactly(arch, attn):
    model = build_model(arch, attn=attn)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(model, inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    get_decoder(model).plan = skipvlm.Plan()  # the runtime's own loop, with nothing skipped
    assert isinstance(get_decoder(model), SkipDecoder)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl", "qwen3_vl"])
def test_hidden_states_and_attentions_match_stock(arch):
    model = build_model(arch, attn="eager")
    inputs = make_inputs(arch, lengths=(6, 3))
    with torch.no_grad():
        stock = model(**inputs, output_hidden_states=True, output_attentions=True)
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
        get_decoder(model).plan = skipvlm.Plan()
        ours = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(stock.hidden_states) == 5
    for a, b in zip(ours.hidden_states, stock.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(ours.attentions, stock.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("layer", [0, 2])
def test_skipped_attention_equals_zero_o_proj(arch, attn, layer):
    model = build_model(arch, attn=attn)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(zero_out(model, layer, "attention"), inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[layer]))
    got = logits(model, inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the skip changed something, so the comparison above is not vacuous
    assert (got - logits(skipvlm.apply_plan(model, skipvlm.Plan()), inputs)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_skipped_mlp_equals_zero_down_proj(arch):
    model = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(zero_out(model, 3, "mlp"), inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_mlp=[3]))
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=1e-5)


def test_skipping_several_modules_composes():
    model = build_model("llama")
    inputs = make_inputs("llama", lengths=(6,))
    ref = zero_out(zero_out(zero_out(model, 0, "attention"), 2, "attention"), 1, "mlp")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0, 2], skip_mlp=[1]))
    torch.testing.assert_close(logits(model, inputs), logits(ref, inputs), rtol=0, atol=1e-5)


# --- no work, no cache ---------------------------------------------------------------------------------


def _count_calls(model, names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i, layer in enumerate(get_layers(model)):
        for name in names:
            key = f"{i}.{name}"
            counts[key] = 0
            module = layer.get_submodule(name)

            def hook(*_args, _key=key):
                counts[_key] += 1

            module.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl", "qwen3_vl"])
def test_skipped_modules_execute_nothing(arch, monkeypatch):
    model = build_model(arch)
    projections = [
        "self_attn",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ]
    counts = _count_calls(model, [*projections, "mlp", "mlp.down_proj"])
    kernel_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        kernel_calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0, 2], skip_mlp=[1]))
    with torch.no_grad():
        model.generate(**make_inputs(arch), max_new_tokens=3, do_sample=False)
    for name in projections:
        assert counts[f"0.{name}"] == counts[f"2.{name}"] == 0, name
        assert counts[f"1.{name}"] == counts[f"3.{name}"] == 3, name  # prefill + 2 decode steps
    assert counts["1.mlp"] == counts["1.mlp.down_proj"] == 0
    assert counts["0.mlp"] == 3
    # 2 attending text layers x 3 forwards (the vision tower may add its own calls for VLMs)
    text_calls = [s for s in kernel_calls if s[1] == 4]  # the text model's 4 query heads
    assert len(text_calls) == 2 * 3


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_skipped_layers_hold_no_kv_cache(arch):
    model = build_model(arch)
    inputs = make_inputs(arch, lengths=(6, 3))
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0, 1]))
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layers = output_cache(out).layers
    assert [isinstance(layer, DummyLayer) for layer in layers] == [True, True, False, False]
    assert all(layer.keys is None for layer in layers[:2])
    assert all(layer.keys.shape[-2] == out.sequences.shape[1] - 1 for layer in layers[2:])
    assert skipvlm.kv_cache_bytes(output_cache(out)) * 2 == skipvlm.kv_cache_bytes(output_cache(full))
    assert output_cache(out).get_seq_length() == out.sequences.shape[1] - 1


def test_plain_forward_with_use_cache_builds_a_cache_without_skipped_layers():
    model = build_model("llama")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0]))
    with torch.no_grad():
        out = model(**make_inputs("llama"), use_cache=True)
    assert isinstance(output_cache(out).layers[0], DummyLayer)
    assert output_cache(out).get_seq_length() == 7


def test_user_cache_without_config_is_sized_and_marked():
    model = build_model("llama")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0]))
    cache = tf.DynamicCache()  # lazily grown, no config
    with torch.no_grad():
        model(**make_inputs("llama"), **cache_kwargs(cache), use_cache=True)
    assert isinstance(cache.layers[0], DummyLayer) and cache.get_seq_length() == 7


# --- generation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_cached_generation_equals_full_recompute(arch):
    model = build_model(arch)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0, 2], skip_mlp=[3]))
    assert_cached_equals_recompute(model, make_inputs(arch, lengths=(6,)), steps=6)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_left_padded_batch_equals_one_by_one(arch):
    model = build_model(arch)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[0], skip_mlp=[2]))
    assert_batch_equals_rows(model, arch, make_inputs(arch, lengths=(7, 3, 5), seed=1), steps=5)


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_image_anywhere_in_the_prompt(arch):
    model = build_model(arch)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    for image_at in (0, 3, 6):
        inputs = make_inputs(arch, lengths=(6,), image_at=image_at)
        tokens, _ = greedy(model, inputs, steps=3)
        ref_tokens, _ = greedy_without_cache(model, inputs, steps=3)
        assert torch.equal(tokens, ref_tokens)


def test_qwen3_vl_takes_1d_position_ids_as_text_positions_as_its_text_model_does():
    """Qwen3-VL's text model keeps 1-D position ids as its text positions (Qwen2-VL's drops them), so
    ids that restart mark packed sequences, which attend within themselves only."""
    model = build_model("qwen3_vl")
    ids = make_inputs("qwen3_vl", lengths=(9,))["input_ids"][:, -10:]  # text only
    packed = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])}
    expected = logits(zero_out(model, 1, "attention"), packed, use_cache=False)
    whole = logits(zero_out(model, 1, "attention"), {"input_ids": ids}, use_cache=False)
    assert (expected[:, 4:] - whole[:, 4:]).abs().max() > 1e-3  # the restart changes the attention
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    torch.testing.assert_close(logits(model, packed, use_cache=False), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "llava", "qwen2_vl", "qwen3_vl"])
def test_half_precision_runs_and_tracks_fp32(arch, dtype):
    plan = skipvlm.Plan(skip_attention=[0, 2])
    ref_model = skipvlm.apply_plan(build_model(arch), plan)
    model = skipvlm.apply_plan(build_model(arch, dtype=dtype), plan)
    inputs = make_inputs(arch, lengths=(6, 3), dtype=dtype)
    half = logits(model, inputs)
    assert half.dtype == dtype and torch.isfinite(half).all()
    ref = logits(ref_model, make_inputs(arch, lengths=(6, 3)))
    # the skips move the logits by ~0.3; half precision stays within 0.02 of fp32 (observed <= 0.005)
    tolerance = 0.02
    stock = logits(build_model(arch), make_inputs(arch, lengths=(6, 3)))
    assert (stock - ref).abs().max() > 5 * tolerance
    assert (half.float() - ref).abs().max() < tolerance
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


# --- errors -----------------------------------------------------------------------------------------------


def test_skipping_every_attention_with_a_cache_raises():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[0, 1, 2, 3]))
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match=r"skips all 4 attentions.*use_cache=False"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, use_cache=False, do_sample=False)
        assert output_cache(model(**inputs)) is None  # no request, no cache, no error
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


def test_out_of_range_plan_is_refused_by_apply_plan():
    model = build_model("llava")
    with pytest.raises(ValueError, match=r"allowed indices are 0\.\.3"):
        skipvlm.apply_plan(model, skipvlm.Plan(skip_mlp=[4]))
    assert skipvlm.current_plan(model).is_empty
    with pytest.raises(TypeError, match=r"skipvlm\.Plan"):
        skipvlm.apply_plan(model, {"skip_attention": [1]})


def test_changing_the_plan_mid_generation_raises():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    inputs = make_inputs("llama")
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
        with pytest.raises(ValueError, match="filled under another plan"):
            model(input_ids=inputs["input_ids"][:, :1], **cache_kwargs(cache), use_cache=True)


# --- restore and weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_current_plan_and_restore(arch):
    model = build_model(arch)
    stock_type = type(get_decoder(model))
    keys = list(model.state_dict())
    inputs = make_inputs(arch, lengths=(6, 3))
    expected = logits(model, inputs)
    plan = skipvlm.Plan(skip_attention=[0, 3], skip_mlp=[1])
    assert skipvlm.apply_plan(model, plan) is model
    assert skipvlm.current_plan(model) == plan
    assert list(model.state_dict()) == keys  # weights and their names untouched
    assert get_layers(model)[0].self_attn.q_proj.weight.abs().sum() > 0
    skipvlm.apply_plan(model, skipvlm.Plan())
    assert type(get_decoder(model)) is stock_type
    assert skipvlm.current_plan(model) == skipvlm.Plan()
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)


def test_train_eval_mode_follows_the_model():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    model.train()
    assert get_decoder(model).training
    skipvlm.apply_plan(model, skipvlm.Plan())
    assert get_decoder(model).training and get_layers(model)[0].training


def test_save_pretrained_with_a_plan_applied_loads_as_stock(tmp_path):
    model = build_model("llava")
    inputs = make_inputs("llava")
    expected = logits(model, inputs)
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
    model.save_pretrained(tmp_path)
    loaded = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)


def test_training_gradients_flow_through_kept_modules_only():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    inputs = make_inputs("llama")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    layers = get_layers(model)
    assert layers[1].self_attn.q_proj.weight.grad is None
    assert layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_gradient_checkpointing_is_honoured_and_exact(monkeypatch):
    inputs = make_inputs("llama", lengths=(6, 3))
    checkpoint = torch.utils.checkpoint.checkpoint
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)

    def grads(checkpointing: bool):
        model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(False)
    assert calls == []
    ckpt = grads(True)
    assert len(calls) == 4  # one checkpointed segment per decoder layer
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)


def test_the_runtime_knows_no_method():
    """The layer loop imports neither the adapters nor token exit: methods reach it as routes and hooks."""
    import ast
    import inspect

    import skipvlm.routes
    import skipvlm.runtime

    for module in (skipvlm.runtime, skipvlm.routes):
        tree = ast.parse(inspect.getsource(module))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        methods = {"skipvlm.pia", "skipvlm.adapters", "skipvlm.eas", "skipvlm.merge", "skipvlm.tokens"}
        assert not {m for m in imported if m and (m in methods or m.startswith("skipvlm.tokens."))}, module


def test_routes_follow_the_plan_and_state_their_formula():
    model = build_model("llama")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1, 3], skip_mlp=[2, 3]))
    routes = get_decoder(model).routes
    assert [type(r).__name__ for r in routes] == ["Stock", "SkipAttention", "SkipMLP", "SkipLayer"]
    assert all("out = " in type(r).__doc__ for r in routes)
    assert [r.runs_attention for r in routes] == [True, False, True, False]


def test_a_copied_model_keeps_no_decode_memory_of_the_original():
    """The decode memory lives on the KV cache, not in the model: a copy made while a cache with memory
    is alive copies none of it (a non-leaf tensor in it would stop deepcopy), and a model does not read
    another model's memory from a shared cache."""
    import copy

    from skipvlm.cache import memory_of

    model = build_model("llama")
    skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[1]))
    ids = torch.tensor([[1, 5, 6, 7]])
    cache = output_cache(model(input_ids=ids, use_cache=True))  # the cache (and its memory) stays alive
    memory = memory_of(cache)
    memory.layers[0] = (torch.ones(1, requires_grad=True) * 2,)  # a non-leaf
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        twin(input_ids=ids[:, -1:], use_cache=True, **cache_kwargs(cache))
    assert memory_of(cache) is not memory and memory_of(cache).layers == {}  # the twin's own, empty
