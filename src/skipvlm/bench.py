"""Latency and KV-cache measurement, the gpt-fast way: warm up, synchronise, perf_counter, medians.

Methods are compared *interleaved* (A B A B ...) inside one run so that a noisy, shared machine
slows every method alike; ratios against a baseline are what we report (``shared/METHODS.md`` §5).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from skipvlm.arch import arch_facts
from skipvlm.compat import output_cache
from skipvlm.plan import Plan
from skipvlm.runtime import apply_plan, current_plan, kv_cache_bytes

__all__ = [
    "PlanTiming",
    "bench_table",
    "format_rows",
    "interleaved",
    "lora_model",
    "measure_models",
    "measure_plans",
    "random_adapters",
    "ratio",
    "run_bench",
    "skip_layers",
    "synchronize",
    "timing_rows",
    "timing_table",
]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so that perf_counter brackets the real compute."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
    setup: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, alternating between them; return seconds per call.

    Args:
        fns: name -> zero-argument callable.
        repeats: timed rounds; each round calls every function once, in order.
        warmup: untimed rounds first (allocator, kernels and caches settle).
        device: synchronised before and after every call.
        progress: show a progress bar over the rounds.
        setup: name -> zero-argument callable run before that function, outside the timed region.
    """
    setup = setup or {}

    def prepare(name: str) -> None:
        if name in setup:
            setup[name]()

    for _ in range(warmup):
        for name, fn in fns.items():
            prepare(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
        for name, fn in fns.items():
            prepare(name)
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class PlanTiming:
    """Medians for one plan: prefill seconds, decode seconds per token, KV-cache bytes after decoding."""

    plan: Plan
    prefill_s: float
    decode_s_per_token: float
    kv_cache_bytes: int
    raw: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.decode_s_per_token if self.decode_s_per_token > 0 else float("inf")


@torch.no_grad()
def measure_plans(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    plans: Mapping[str, Plan],
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, PlanTiming]:
    """Measure prefill latency, decode latency per token and KV-cache size of each plan on one model.

    Prefill is one forward over the prompt. Decode per token is ``(t(generate n) - t(generate 1)) / (n-1)``
    with greedy decoding forced to ``n`` tokens, which times the real ``generate`` loop (cache updates,
    logits processing) rather than a hand-written one. All plans are interleaved in every round.

    Args:
        model: a supported model; its plan is restored afterwards.
        inputs: model-ready inputs (``input_ids``, ``attention_mask``, images ...).
        plans: name -> plan.
        new_tokens: tokens to decode (>= 2).
        repeats, warmup, progress: as in :func:`interleaved`.
    """
    original = current_plan(model)
    try:
        targets = {name: (model, functools.partial(apply_plan, model, plan)) for name, plan in plans.items()}
        return _measure(targets, inputs, new_tokens, repeats, warmup, progress)
    finally:
        apply_plan(model, original)


@torch.no_grad()
def measure_models(
    models: Mapping[str, nn.Module],
    inputs: Mapping[str, torch.Tensor],
    new_tokens: int = 16,
    repeats: int = 5,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, PlanTiming]:
    """:func:`measure_plans` for several models as they are (e.g. unmerged adapters vs merged weights).

    Each model's timing carries the plan it runs (:func:`~skipvlm.runtime.current_plan`).
    """
    return _measure({n: (m, None) for n, m in models.items()}, inputs, new_tokens, repeats, warmup, progress)


def _measure(
    targets: Mapping[str, tuple[nn.Module, Callable[[], Any] | None]],
    inputs: Mapping[str, torch.Tensor],
    new_tokens: int,
    repeats: int,
    warmup: int,
    progress: bool,
) -> dict[str, PlanTiming]:
    """Time prefill, generate(1) and generate(n) of every (model, untimed setup) target, interleaved."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")

    def generate(model: nn.Module, n: int) -> Callable[[], Any]:
        return lambda: model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True
        )

    fns: dict[str, Callable[[], Any]] = {}
    setup: dict[str, Callable[[], Any]] = {}
    for name, (model, prepare) in targets.items():
        # logits for the last position only, as `generate` asks for them
        fns[f"{name}/prefill"] = functools.partial(model, **inputs, use_cache=True, logits_to_keep=1)
        fns[f"{name}/gen1"] = generate(model, 1)
        fns[f"{name}/genN"] = generate(model, new_tokens)
        if prepare is not None:  # e.g. switching plans: not part of what is timed
            setup |= {f"{name}/{part}": prepare for part in ("prefill", "gen1", "genN")}
    device = next(next(iter(targets.values()))[0].parameters()).device
    times = interleaved(fns, repeats=repeats, warmup=warmup, device=device, progress=progress, setup=setup)
    results = {}
    for name, (model, prepare) in targets.items():
        if prepare is not None:
            prepare()
        cache = output_cache(generate(model, new_tokens)())
        gen1, gen_n = times[f"{name}/gen1"], times[f"{name}/genN"]
        per_token = [(b - a) / (new_tokens - 1) for a, b in zip(gen1, gen_n, strict=True)]
        results[name] = PlanTiming(
            plan=current_plan(model),
            prefill_s=statistics.median(times[f"{name}/prefill"]),
            decode_s_per_token=max(statistics.median(per_token), 0.0),
            kv_cache_bytes=kv_cache_bytes(cache),
            raw={k.split("/", 1)[1]: v for k, v in times.items() if k.startswith(f"{name}/")},
        )
    return results


def ratio(num: float, den: float) -> float:
    """num / den, or NaN where noise left a non-positive denominator (never a ZeroDivisionError)."""
    return num / den if den > 0 else float("nan")


def timing_rows(results: Mapping[str, PlanTiming], baseline: str) -> list[dict[str, Any]]:
    """JSON-ready rows: medians in ms, and speedups / KV ratio against the ``baseline`` entry.

    A ratio whose denominator measured as zero (timer noise on a tiny model) is NaN.
    """
    base = results[baseline]
    rows = []
    for name, r in results.items():
        rows.append(
            {
                "name": name,
                "plan": r.plan.to_dict(),
                "prefill_ms": r.prefill_s * 1e3,
                "decode_ms_per_token": r.decode_s_per_token * 1e3,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "kv_cache_bytes": r.kv_cache_bytes,
                "prefill_speedup": ratio(base.prefill_s, r.prefill_s),
                "decode_speedup": ratio(base.decode_s_per_token, r.decode_s_per_token),
                "kv_ratio": ratio(r.kv_cache_bytes, base.kv_cache_bytes),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]], columns: list[tuple]) -> str:
    """A fixed-width text table: one ``(header, width, cell)`` per column, numbers right-aligned.

    The first column, and any given as ``(header, width, cell, "<")``, is left-aligned.
    """

    def fit(i: int, column: tuple, text: str) -> str:
        left = i == 0 or column[3:] == ("<",)
        return f"{text:<{column[1]}}" if left else f"{text:>{column[1]}}"

    head = "".join(fit(i, c, c[0]) for i, c in enumerate(columns))
    lines = [head, "-" * len(head)]
    lines += ["".join(fit(i, c, c[2](r)) for i, c in enumerate(columns)) for r in rows]
    return "\n".join(lines)


def timing_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of :func:`timing_rows` output."""
    return format_rows(
        rows,
        [
            ("plan", 22, lambda r: r["name"]),
            ("prefill ms", 11, lambda r: f"{r['prefill_ms']:.2f}"),
            ("x", 6, lambda r: f"{r['prefill_speedup']:.2f}"),
            ("decode ms/tok", 15, lambda r: f"{r['decode_ms_per_token']:.2f}"),
            ("x", 6, lambda r: f"{r['decode_speedup']:.2f}"),
            ("tok/s", 8, lambda r: f"{r['decode_tokens_per_s']:.1f}"),
            ("KV MiB", 9, lambda r: f"{r['kv_cache_bytes'] / 2**20:.2f}"),
            ("x", 6, lambda r: f"{r['kv_ratio']:.2f}"),
        ],
    )


# --- the method comparison of `skipvlm bench` -----------------------------------------------------------


def skip_layers(num_layers: int, k: int) -> list[int]:
    """The k attentions a benchmark skips: odd layers first (layer 0 kept), then even ones from the top."""
    order = list(range(1, num_layers, 2)) + list(range(num_layers - 2, -1, -2))
    if not 0 <= k <= num_layers:
        raise ValueError(f"cannot skip {k} attentions of a {num_layers}-layer model")
    return sorted(order[:k])


LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def lora_model(model: nn.Module, rank: int = 8, targets: str = LORA_TARGETS) -> nn.Module:
    """``model`` with PEFT LoRA (alpha = 2 r, no dropout) on the projections matching ``targets``."""
    import warnings

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config).eval()


def _per_token_adapter_macs(model: nn.Module) -> int:
    """MACs per token of branches outside the stock weights (unmerged LoRA / PIA), from their weights."""
    total = 0
    for name, p in model.named_parameters():
        if p.ndim < 2:
            continue
        if "lora_" in name or (".pia_adapters." in name and ".router." not in name and ".pool." not in name):
            total += p.numel()
    return total


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

    Methods: ``stock``; ``lora`` (PEFT LoRA r=8 on every projection, unmerged); ``pia`` (PIA adapters,
    nothing skipped, unmerged: an adapter branch); ``eas`` (k attentions skipped, adapters merged with
    the static merge, for every k in ``skips``); ``skip`` (the plain skip plan, no adapters). Each row
    carries the medians, the speedups against ``stock``, and the roofline: the bound the removed work
    allows (MACs for prefill; bytes read per token for decode) and measured / bound.
    """
    import copy

    from skipvlm.cost import count_macs, decode_bytes
    from skipvlm.eas import EASConfig, get_eas_model

    unknown = sorted(set(methods) - {"stock", "lora", "pia", "eas", "skip"})
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; choose from stock, lora, pia, eas, skip")
    num_layers = arch_facts(model).num_layers
    prompt = int(inputs["input_ids"].shape[1])
    models: dict[str, nn.Module] = {"stock": model}
    if "lora" in methods:
        models["lora (unmerged)"] = lora_model(copy.deepcopy(model))
    if "pia" in methods:
        models["pia (unmerged)"] = random_adapters(get_eas_model(copy.deepcopy(model), EASConfig()), inputs)
    for k in skips:
        plan = Plan(skip_attention=skip_layers(num_layers, k))
        if "skip" in methods and k:
            models[f"skip k={k}"] = apply_plan(copy.deepcopy(model), plan)
        if "eas" in methods:
            eas = get_eas_model(copy.deepcopy(model), EASConfig(skip_attention=list(plan.skip_attention)))
            models[f"eas k={k} (merged)"] = random_adapters(eas, inputs).merge_and_unload("static")
    timings = measure_models(
        models, inputs, new_tokens=new_tokens, repeats=repeats, warmup=warmup, progress=progress
    )
    rows = timing_rows(timings, baseline="stock")
    stock_macs = count_macs(model, prompt).total
    context = prompt + new_tokens // 2
    stock_bytes = decode_bytes(model, Plan(), context)
    for row in rows:
        m = models[row["name"]]
        plan = current_plan(m.get_base_model()) if hasattr(m, "peft_config") else current_plan(m)
        extra = _per_token_adapter_macs(m)
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
        row["peak_memory_bytes"] = _peak_memory(m, inputs, new_tokens)
    return rows


def _peak_memory(model: nn.Module, inputs: Mapping[str, torch.Tensor], new_tokens: int) -> int | None:
    """Peak device memory of one ``generate`` on CUDA (weights included); ``None`` on other devices."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@torch.no_grad()
def random_adapters(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> nn.Module:
    """Non-zero adapters, calibrated on the prompt, as after training (speed does not depend on values)."""
    gen = torch.Generator().manual_seed(0)
    for p in model.adapters.parameters():
        p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p))
    model.calibrate([dict(inputs)], progress=False)
    return model.eval()


def bench_table(rows: list[dict[str, Any]]) -> str:
    """Medians, speedups against the stock model, and the roofline bounds, side by side."""
    return format_rows(
        rows,
        [
            ("method", 20, lambda r: r["name"]),
            ("prefill ms", 11, lambda r: f"{r['prefill_ms']:.2f}"),
            ("x", 6, lambda r: f"{r['prefill_speedup']:.2f}"),
            ("bound", 7, lambda r: f"{r['prefill_bound']:.2f}"),
            ("of", 6, lambda r: f"{100 * r['prefill_of_bound']:.0f}%"),
            ("decode ms/tok", 15, lambda r: f"{r['decode_ms_per_token']:.2f}"),
            ("x", 6, lambda r: f"{r['decode_speedup']:.2f}"),
            ("bound", 7, lambda r: f"{r['decode_bound']:.2f}"),
            ("of", 6, lambda r: f"{100 * r['decode_of_bound']:.0f}%"),
            ("tok/s", 8, lambda r: f"{r['decode_tokens_per_s']:.1f}"),
            ("KV MiB", 8, lambda r: f"{r['kv_cache_bytes'] / 2**20:.2f}"),
        ],
    )
