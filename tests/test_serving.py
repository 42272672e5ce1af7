"""Serving paths under a plan: the static KV cache (skipped layers allocate nothing) and the compiled
decoding step (no graph breaks, the eager tokens)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CompileConfig

import skipvlm
from skipvlm.compat import DummyLayer, StaticCache, StaticLayer, cache_kwargs, output_cache

from conftest import build_eas, build_model, make_inputs, randomize_adapters

STEPS = 5


def _generate(model, inputs, **kw):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, **kw
        )
    return out.sequences, output_cache(out)


def _merged_eas(arch: str, skip=(1, 2)):
    eas = randomize_adapters(build_eas(arch, skip=skip))
    with torch.no_grad():
        eas.calibrate([dict(make_inputs(arch, lengths=(6, 3)))], progress=False)
    return eas.merge_and_unload("static")


@pytest.mark.parametrize("arch", ["llama", "mistral", "llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize(
    "plan",
    [
        skipvlm.Plan(skip_attention=[0, 2]),
        skipvlm.Plan(skip_attention=[1], skip_mlp=[3]),
        skipvlm.Plan(skip_attention=[1, 3], skip_mlp=[1, 3]),
    ],
    ids=["attention", "attention+mlp", "layers"],
)
def test_static_cache_generates_the_dynamic_cache_tokens_under_a_plan(arch, plan):
    model = skipvlm.apply_plan(build_model(arch), plan)
    inputs = make_inputs(arch, lengths=(6, 3))  # left-padded
    dynamic, _ = _generate(model, inputs)
    static, cache = _generate(model, inputs, cache_implementation="static")
    assert isinstance(cache, StaticCache)
    assert torch.equal(static, dynamic)
    runs = [plan.runs_attention(i) for i in range(len(cache.layers))]
    assert [not isinstance(layer, DummyLayer) for layer in cache.layers] == runs


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_static_cache_runs_merged_and_unmerged_eas(arch):
    eas = randomize_adapters(build_eas(arch, skip=(1, 2)))
    inputs = make_inputs(arch, lengths=(6, 3))
    with torch.no_grad():
        eas.calibrate([dict(inputs)], progress=False)
    unmerged_dynamic, _ = _generate(eas, inputs)
    unmerged_static, _ = _generate(eas, inputs, cache_implementation="static")
    assert torch.equal(unmerged_static, unmerged_dynamic)
    merged = copy.deepcopy(eas).merge_and_unload("static")
    static, _ = _generate(merged, inputs, cache_implementation="static")
    assert torch.equal(static, _generate(merged, inputs)[0])


def _static_bytes(model, inputs, early: bool) -> tuple[int, StaticCache]:
    """Bytes of a user-built static cache after a prefill (``early``: allocated before it)."""
    config = model.config.get_text_config(decoder=True)
    cache = StaticCache(config=config, max_cache_len=24)
    if early:
        heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
        batch = inputs["input_ids"].shape[0]
        cache.early_initialization(batch, heads, dim, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(**inputs, use_cache=True, **cache_kwargs(cache))
    return skipvlm.kv_cache_bytes(cache), cache


@pytest.mark.parametrize("early", [False, True], ids=["lazy", "early-initialised"])
def test_static_cache_bytes_shrink_by_exactly_the_skipped_layers_share(early):
    model = build_model("llama")  # 4 layers
    inputs = make_inputs("llama", lengths=(6, 3))
    stock, _ = _static_bytes(model, inputs, early)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_layer = 2 * 2 * 24 * config.num_key_value_heads * head_dim * 4
    assert stock == config.num_hidden_layers * per_layer  # (K, V) x B x max_len x H_kv x D x fp32
    for skipped in ([1], [0, 2], [0, 1, 3]):
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=skipped))
        planned, cache = _static_bytes(model, inputs, early)
        assert planned * 4 == stock * (4 - len(skipped))  # exactly the kept layers' share
        assert [i for i, layer in enumerate(cache.layers) if isinstance(layer, DummyLayer)] == skipped
        assert all(isinstance(cache.layers[i], StaticLayer) for i in range(4) if i not in skipped)


def test_a_user_built_static_cache_decodes_step_by_step_like_the_dynamic_one():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[0, 3]))
    inputs = make_inputs("llama", lengths=(7, 4))
    expected, _ = _generate(model, inputs)
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + STEPS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        step_ids = ids
        for _ in range(STEPS):
            out = model(input_ids=step_ids, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
            logits = out.logits
            step_ids = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, step_ids], 1), torch.cat([mask, torch.ones_like(step_ids)], 1)
    assert torch.equal(ids, expected)


def test_token_exit_refuses_a_static_cache_naming_the_fix():
    model = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(visual_exit_layer=2))
    inputs = make_inputs("llava", lengths=(6, 3))
    with pytest.raises(ValueError, match=r"withdraw visual tokens.*static cache.*drop cache_implementation"):
        _generate(model, inputs, cache_implementation="static")


def test_a_static_cache_filled_under_another_plan_is_refused():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_attention=[1]))
    inputs = make_inputs("llama", lengths=(6, 3))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(**inputs, use_cache=True, **cache_kwargs(cache))
        skipvlm.apply_plan(model, skipvlm.Plan(skip_attention=[2]))
        with pytest.raises(ValueError, match="filled under another plan"):
            model(input_ids=inputs["input_ids"][:, -1:], use_cache=True, **cache_kwargs(cache))


# --- compiled decoding ---------------------------------------------------------------------------------


def _decode_step_graph_breaks(model, arch: str):
    """``torch._dynamo.explain`` of one decoding step after an eager prefill into a static cache."""
    inputs = make_inputs(arch, lengths=(6, 3))
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 4)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = model(**inputs, use_cache=True, **cache_kwargs(cache)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        return torch._dynamo.explain(model.forward)(
            input_ids=nxt, attention_mask=mask, use_cache=True, **cache_kwargs(cache)
        )


@pytest.mark.parametrize(
    "kind, arch",
    [("plan", "llama"), ("merged", "llama"), ("plan", "llava")],
)
def test_the_decoding_step_compiles_without_graph_breaks(kind, arch):
    if kind == "plan":
        model = skipvlm.apply_plan(build_model(arch), skipvlm.Plan(skip_attention=[0, 2], skip_mlp=[3]))
    else:
        model = _merged_eas(arch)
    report = _decode_step_graph_breaks(model, arch)
    reasons = [str(r.reason) for r in report.break_reasons]
    assert report.graph_break_count == 0, reasons
    assert report.graph_count == 1


def _compiled(model, inputs):
    config = CompileConfig(fullgraph=True, mode="default")  # fullgraph: a graph break is an error
    config._compile_all_devices = True  # transformers compiles on accelerators only unless asked
    return _generate(model, inputs, cache_implementation="static", compile_config=config)


def test_compiled_decoding_of_a_merged_model_gives_the_eager_tokens():
    torch._dynamo.reset()
    model = _merged_eas("llama")
    inputs = make_inputs("llama", lengths=(6, 3))
    eager, _ = _generate(model, inputs)
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, cache = _compiled(model, inputs)
    # compilation happened (transformers only warns when it skips it, and the tokens would still match)
    assert counters["stats"]["unique_graphs"] >= 1
    assert torch.equal(compiled, eager)
    assert sum(isinstance(layer, DummyLayer) for layer in cache.layers) == 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_compiled_decoding_under_a_plan_and_unmerged_adapters_gives_the_eager_tokens(arch):
    torch._dynamo.reset()
    inputs = make_inputs(arch, lengths=(6, 3))
    model = skipvlm.apply_plan(build_model(arch), skipvlm.Plan(skip_attention=[1, 2]))
    assert torch.equal(_compiled(model, inputs)[0], _generate(model, inputs)[0])
    eas = randomize_adapters(build_eas(arch, skip=(1, 2)))
    with torch.no_grad():
        eas.calibrate([dict(inputs)], progress=False)
    assert torch.equal(_compiled(eas, inputs)[0], _generate(eas, inputs)[0])


# --- generate's batch expansion and chunked prefill --------------------------------------------------------


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_unmerged_eas_pools_each_prompt_for_every_returned_sequence(cache):
    # generate repeats each prompt (repeat_interleave) for num_return_sequences / beams; every copy must
    # pool over its own prompt: sampling with top_k=1 is greedy, so each copy gives its prompt's tokens
    eas = randomize_adapters(build_eas("llava", skip=(1, 2)))
    inputs = make_inputs("llava", lengths=(9, 6))
    with torch.no_grad():
        eas.calibrate([dict(inputs)], progress=False)
    kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
    greedy, _ = _generate(eas, inputs, **kw)
    with torch.no_grad():
        copies = eas.generate(
            **inputs, max_new_tokens=STEPS, do_sample=True, top_k=1, num_return_sequences=2, **kw
        )
    assert torch.equal(copies[0::2], greedy) and torch.equal(copies[1::2], greedy)
    beams, _ = _generate(eas, inputs, num_beams=2, **kw)  # runs: the beams' rows pool too
    assert beams.shape[0] == 2


def test_chunked_prefill_is_refused_where_the_prefill_must_see_the_whole_prompt():
    inputs = make_inputs("llava", lengths=(9, 6))
    eas = build_eas("llava", skip=(1, 2))
    with pytest.raises(ValueError, match=r"first chunk only; drop prefill_chunk_size"):
        _generate(eas, inputs, prefill_chunk_size=4)
    vtw = skipvlm.apply_plan(build_model("llava"), skipvlm.Plan(visual_exit_layer=2))
    with pytest.raises(ValueError, match=r"visual tokens arrived after the prefill.*drop prefill_chunk_size"):
        _generate(vtw, inputs, prefill_chunk_size=4)
