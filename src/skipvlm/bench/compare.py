"""`skipvlm bench`: the stock model against the alternatives, timed interleaved, with the roofline.

Every row holds the medians and speedups of :func:`~skipvlm.bench.tables.timing_rows` for one batch
size and one mode (``eager``: dynamic cache; ``compiled``: static cache and a compiled decoding step),
and the bound the removed work allows:

* prefill: stock MACs / method MACs (:func:`~skipvlm.cost.count_macs`, token exit and adapter branches
  included);
* decode: bytes one decoding step reads, stock / method. A step reads the weights that run once for the
  whole batch and every sequence's KV cache: ``W + B * KV``, where ``KV`` counts, per kept attention, the
  tokens its cache holds (fewer after a visual-token exit) (:func:`~skipvlm.cost.decode_bytes`).

Per-sequence decode time is the time of one step (every sequence of the batch gains a token); the
batch's throughput is ``B`` tokens per step.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from skipvlm.arch import arch_facts
from skipvlm.bench.methods import TokenExitRows, adapter_macs_per_token, bench_models
from skipvlm.bench.tables import timing_rows
from skipvlm.bench.timing import MODES, compile_budget, generate_kwargs, measure_models, peak_memory, ratio
from skipvlm.cost import count_macs, decode_bytes
from skipvlm.plan import Plan
from skipvlm.runtime import current_plan

__all__ = ["decode_step_bytes", "run_bench"]


def _plan_of(model: nn.Module) -> Plan:
    return current_plan(model.get_base_model()) if hasattr(model, "peft_config") else current_plan(model)


def decode_step_bytes(
    model: nn.Module, plan: Plan, context: int, batch: int = 1, visual_tokens: int = 0
) -> int:
    """Bytes one decoding step of a batch reads: the weights that run, once, plus every sequence's KV cache
    of ``context`` tokens in each kept attention (``context - dropped`` in the layers after a visual-token
    exit, by the exit method's rule)."""
    weights = decode_bytes(model, plan, 0)
    kv_all = decode_bytes(model, plan, context) - weights  # kept layers x context tokens
    if plan.token_exit is None or context == 0:
        return weights + batch * kv_all
    facts = arch_facts(model)
    start, dropped = plan.token_exit.macs(plan, visual_tokens, None)
    kept = [i for i in range(facts.num_layers) if i not in plan.skip_attention]
    per_token = kv_all / (len(kept) * context)
    tokens = sum(context - dropped if i >= start else context for i in kept)
    return int(weights + batch * per_token * tokens)


def _visual_tokens(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> int:
    """Visual tokens of the first prompt (every benched prompt holds one image)."""
    image = arch_facts(model).image_token_id
    return int((inputs["input_ids"][0] == image).sum()) if image is not None else 0


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
    *,
    batches: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    modes: Sequence[str] = ("eager",),
    exits: TokenExitRows | None = None,
    backend: str = "inductor",
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time the stock model against the alternatives a user would pick, interleaved in one run.

    Rows also hold the end-to-end ``generate`` time, the weight bytes, the KV-cache bytes (the dynamic
    cache's after decoding; the static cache's allocation in ``compiled`` mode) and, on CUDA, the peak
    memory of one ``generate``.

    Methods (built by :func:`~skipvlm.bench.methods.bench_models`): ``stock``, ``lora``, ``pia``,
    ``lavin``, ``eas`` (merged, for every k in ``skips``), ``skip``, ``vtw``, ``fastv``, ``eas+vtw``.
    Each row carries the medians, the speedups against ``stock`` at its batch size and mode, and the
    roofline: the bound the removed work allows and measured / bound. Token-exit rows run in ``eager``
    mode only (a static cache cannot hold their per-layer token counts).

    Args:
        inputs: the prompt adapters are calibrated on; also the benched batch if ``batches`` is None.
        batches: batch size -> model-ready (left-padded) inputs, one set of rows each.
        modes: ``eager`` and / or ``compiled``.
        exits: the token-exit rows' settings.
        backend: ``torch.compile``'s backend in ``compiled`` mode.
        on_rows: called with the rows so far after each batch size and mode (e.g. to save them, so a
            run that fails or is stopped later keeps what it measured).

    Raises:
        ValueError: an unknown method or mode.
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown bench mode(s) {unknown}; choose from {', '.join(MODES)}")
    batches = dict(batches) if batches else {int(inputs["input_ids"].shape[0]): inputs}
    models = bench_models(model, inputs, skips, methods, exits)
    device = next(model.parameters()).device
    rows: list[dict[str, Any]] = []
    for batch, batch_inputs in sorted(batches.items()):
        for mode in modes:
            chosen = {n: m for n, m in models.items() if mode == "eager" or not _plan_of(m).exits_tokens}
            if mode == "compiled":
                torch._dynamo.reset()  # static shapes per batch size: no graph of another size kept
            with compile_budget(2 * len(chosen) + 8):
                timings = measure_models(
                    chosen, batch_inputs, new_tokens, repeats, warmup, progress, mode=mode, backend=backend
                )
                extra = generate_kwargs(mode, device, backend)
                new = timing_rows(timings, baseline="stock")
                for row in new:
                    m = chosen[row["name"]]
                    row["peak_memory_bytes"] = peak_memory(m, batch_inputs, new_tokens, **extra)
                    row["generate_ms"] = statistics.median(timings[row["name"]].raw["genN"]) * 1e3
            _add_bounds(model, chosen, new, batch_inputs, batch, new_tokens)
            for row in new:
                row["batch_size"], row["mode"] = batch, mode
                row["cache"] = "dynamic" if mode == "eager" else "static"
                row["batch_tokens_per_s"] = batch * row["decode_tokens_per_s"]
            rows += new
            if on_rows is not None:
                on_rows(list(rows))
    _add_cross_ratios(rows)
    return rows


def _add_bounds(
    model: nn.Module,
    models: Mapping[str, nn.Module],
    rows: list[dict[str, Any]],
    inputs: Mapping[str, torch.Tensor],
    batch: int,
    new_tokens: int,
) -> None:
    prompt = int(inputs["input_ids"].shape[1])
    visual = _visual_tokens(model, inputs)
    stock_macs = count_macs(model, prompt, visual_tokens=visual).total
    context = prompt + new_tokens // 2
    stock_bytes = decode_step_bytes(model, Plan(), context, batch, visual)
    for row in rows:
        m = models[row["name"]]
        plan = _plan_of(m)
        extra = adapter_macs_per_token(m)
        macs = count_macs(model, prompt, plan, extra_per_token=extra, visual_tokens=visual).total
        elt = next(model.parameters()).element_size()
        read = decode_step_bytes(model, plan, context, batch, visual) + extra * elt
        row["skipped_attentions"] = len(plan.skip_attention)
        row["macs_g"] = macs / 1e9
        row["prefill_bound"] = stock_macs / macs
        row["decode_bound"] = stock_bytes / read
        row["prefill_of_bound"] = row["prefill_speedup"] / row["prefill_bound"]
        row["decode_of_bound"] = row["decode_speedup"] / row["decode_bound"]
        row["weight_bytes"] = sum(p.numel() * p.element_size() for p in m.parameters())


def _add_cross_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup_kept_vs_batch1``: a row's decode speedup over stock / the same method's at the smallest
    batch (same mode); ``compile_speedup``: eager decode time / compiled decode time (same batch)."""
    index = {(r["name"], r["batch_size"], r["mode"]): r for r in rows}
    smallest = min(r["batch_size"] for r in rows)
    for row in rows:
        first = index.get((row["name"], smallest, row["mode"]))
        row["speedup_kept_vs_batch1"] = (
            ratio(row["decode_speedup"], first["decode_speedup"]) if first else None
        )
        eager = index.get((row["name"], row["batch_size"], "eager"))
        if row["mode"] == "compiled" and eager is not None:
            row["compile_speedup"] = ratio(eager["decode_ms_per_token"], row["decode_ms_per_token"])
        else:
            row["compile_speedup"] = None
