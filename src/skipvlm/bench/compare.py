"""`skipvlm bench`: the stock model against the alternatives, timed interleaved, with the roofline.

Every row holds the medians and speedups of :func:`~skipvlm.bench.tables.timing_rows`, and the bound
the removed work allows: MACs for prefill (:func:`~skipvlm.cost.count_macs`), bytes read per token for
decode (:func:`~skipvlm.cost.decode_bytes`), each counting the adapter branches a model still runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from skipvlm.bench.methods import adapter_macs_per_token, bench_models
from skipvlm.bench.tables import timing_rows
from skipvlm.bench.timing import measure_models, peak_memory
from skipvlm.cost import count_macs, decode_bytes
from skipvlm.plan import Plan
from skipvlm.runtime import current_plan

__all__ = ["run_bench"]


@torch.no_grad()
def run_bench(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    skips: list[int],
    methods: list[str],
    new_tokens: int = 32,
    repeats: int = 7,
    warmup: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Time the stock model against the alternatives a user would pick, interleaved in one run.

    Rows also hold the end-to-end ``generate`` time, the weight bytes and, on CUDA, the peak memory of
    one ``generate``.

    Methods (built by :func:`~skipvlm.bench.methods.bench_models`): ``stock``; ``lora`` (PEFT LoRA r=8
    on every projection, unmerged); ``pia`` (PIA adapters, nothing skipped, unmerged: an adapter
    branch); ``eas`` (k attentions skipped, adapters merged with the static merge, for every k in
    ``skips``); ``skip`` (the plain skip plan, no adapters). Each row carries the medians, the speedups
    against ``stock``, and the roofline: the bound the removed work allows (MACs for prefill; bytes read
    per token for decode) and measured / bound.

    Raises:
        ValueError: an unknown method name.
    """
    models = bench_models(model, inputs, skips, methods)
    timings = measure_models(
        models, inputs, new_tokens=new_tokens, repeats=repeats, warmup=warmup, progress=progress
    )
    rows = timing_rows(timings, baseline="stock")
    prompt = int(inputs["input_ids"].shape[1])
    stock_macs = count_macs(model, prompt).total
    context = prompt + new_tokens // 2
    stock_bytes = decode_bytes(model, Plan(), context)
    for row in rows:
        m = models[row["name"]]
        plan = current_plan(m.get_base_model()) if hasattr(m, "peft_config") else current_plan(m)
        extra = adapter_macs_per_token(m)
        macs = count_macs(model, prompt, plan, extra_per_token=extra).total
        read = decode_bytes(model, plan, context) + extra * next(model.parameters()).element_size()
        row["skipped_attentions"] = len(plan.skip_attention)
        row["macs_g"] = macs / 1e9
        row["prefill_bound"] = stock_macs / macs
        row["decode_bound"] = stock_bytes / read
        row["prefill_of_bound"] = row["prefill_speedup"] / row["prefill_bound"]
        row["decode_of_bound"] = row["decode_speedup"] / row["decode_bound"]
        row["generate_ms"] = statistics.median(timings[row["name"]].raw["genN"]) * 1e3
        row["weight_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())
        row["peak_memory_bytes"] = peak_memory(m, inputs, new_tokens)
    return rows
