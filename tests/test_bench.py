"""Measurement helpers: interleaving, ratios that survive noisy timers, the compared methods' extra MACs."""

import re

import pytest
from torch import nn

import skipvlm
from skipvlm.bench import (
    PlanTiming,
    adapter_macs_per_token,
    bench_models,
    interleaved,
    lora_model,
    measure_models,
    measure_plans,
    timing_rows,
    timing_table,
)

from conftest import build_eas, build_model, make_inputs


def test_interleaved_alternates_and_counts():
    order = []
    times = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_interleaved_setup_runs_untimed_before_each_call():
    order = []
    interleaved(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")},
        repeats=2,
        warmup=0,
        setup={"a": lambda: order.append("setup-a")},
    )
    assert order == ["setup-a", "a", "b"] * 2


def test_measure_plans_restores_the_plan_and_reports_kv_bytes():
    model = skipvlm.apply_plan(build_model("llama"), skipvlm.Plan(skip_mlp=[0]))
    plans = {"none": skipvlm.Plan(), "half": skipvlm.Plan(skip_attention=[1, 3])}
    # 12 tokens and the median of 3 rounds: two extra tokens (the old 3) drowned in a busy machine's noise
    res = measure_plans(model, make_inputs("llama"), plans, new_tokens=12, repeats=3, warmup=0)
    assert skipvlm.current_plan(model) == skipvlm.Plan(skip_mlp=[0])
    assert res["half"].kv_cache_bytes * 2 == res["none"].kv_cache_bytes > 0
    assert all(len(r.raw["prefill"]) == 3 and r.prefill_s > 0 for r in res.values())
    assert all(r.decode_s_per_token > 0 for r in res.values())  # decoding 11 more tokens takes time


def test_measure_models_times_each_model_with_its_own_plan():
    models = {"stock": build_model("llama"), "eas": build_eas("llama", skip=(0, 2))}
    res = measure_models(models, make_inputs("llama"), new_tokens=3, repeats=2, warmup=0)
    assert res["eas"].plan == skipvlm.Plan(skip_attention=[0, 2]) and res["stock"].plan == skipvlm.Plan()
    assert res["eas"].kv_cache_bytes * 2 == res["stock"].kv_cache_bytes > 0
    assert all(len(r.raw["genN"]) == 2 for r in res.values())


def test_timing_rows_survive_a_zero_measurement():
    timings = {
        "stock": PlanTiming(skipvlm.Plan(), prefill_s=0.2, decode_s_per_token=0.01, kv_cache_bytes=100),
        "skip": PlanTiming(skipvlm.Plan(skip_attention=[1]), 0.1, 0.0, 50),
    }
    rows = timing_rows(timings, baseline="stock")
    assert rows[1]["prefill_speedup"] == 2.0 and rows[1]["kv_ratio"] == 0.5
    assert rows[1]["decode_speedup"] != rows[1]["decode_speedup"]  # NaN, not a crash
    assert "nan" in timing_table(rows)


def test_adapter_macs_count_the_per_token_branch_weights_only():
    eas = build_eas("llama", skip=(0, 2))
    # the router and the pooled path run once per prompt, not per token
    per_prompt = {
        id(p)
        for name, module in eas.adapters.named_modules()
        if name.rsplit(".", 1)[-1] in ("router", "pool")
        for p in module.parameters()
    }
    branch = sum(p.numel() for p in eas.adapters.parameters() if p.ndim >= 2 and id(p) not in per_prompt)
    assert adapter_macs_per_token(eas) == branch > 0

    model = build_model("llama")
    pattern = skipvlm.lora_target_modules(model, skipvlm.lora.ALL_PROJECTIONS)
    targets = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    assert len(targets) == 7 * 4
    assert adapter_macs_per_token(model) == 0
    assert (
        adapter_macs_per_token(lora_model(model, rank=8))
        == sum(8 * (m.in_features + m.out_features) for m in targets)
        > 0
    )


def test_bench_models_refuses_an_unknown_method_naming_the_known_ones():
    known = r"choose from stock, lora, pia, lavin, eas, skip, vtw, fastv, eas\+vtw"
    with pytest.raises(ValueError, match=known):
        bench_models(build_model("llama"), make_inputs("llama"), [0], ["stock", "fast"])
