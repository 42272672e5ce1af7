"""Timing primitives, the gpt-fast way: warm up, synchronise, perf_counter, medians.

Methods are compared *interleaved* (A B A B ...) inside one run so that a noisy, shared machine
slows every method alike; ratios against a baseline are what we report (``shared/METHODS.md`` §5).
:func:`measure_plans` / :func:`measure_models` time prefill, decode per token and the KV cache;
:func:`peak_memory` reads the CUDA allocator's peak of one ``generate``.

Two modes (:data:`MODES`): ``eager`` generates with the default ``DynamicCache``; ``compiled`` with a
static cache and transformers' compiled decoding step (``generate(..., cache_implementation="static",
compile_config=...)``, :func:`generate_kwargs`), the way a model is served on one GPU. The prefill runs
eagerly in both, as ``generate`` runs it.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from skipvlm.compat import StaticCache, cache_kwargs, output_cache
from skipvlm.plan import Plan
from skipvlm.runtime import apply_plan, current_plan, kv_cache_bytes

__all__ = [
    "MODES",
    "PlanTiming",
    "compile_budget",
    "generate_kwargs",
    "interleaved",
    "measure_models",
    "measure_plans",
    "peak_memory",
    "ratio",
    "synchronize",
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


MODES = ("eager", "compiled")


def generate_kwargs(mode: str, device: torch.device, backend: str = "inductor") -> dict[str, Any]:
    """The ``generate`` keywords of a timing mode (:data:`MODES`).

    ``compiled``: a static cache and a compiled decoding step. On CUDA, transformers' own compile
    configuration (``mode="reduce-overhead"``: CUDA graphs, the gpt-fast recipe); elsewhere
    ``mode="default"``, with compilation asked for explicitly (transformers compiles on accelerators only
    by default). ``backend``: the ``torch.compile`` backend (``eager`` / ``aot_eager`` only trace, for
    quick checks).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown timing mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "eager":
        return {}
    from transformers import CompileConfig

    options: dict[str, Any] = {"backend": backend}
    if device.type != "cuda" or backend != "inductor":
        options["mode"] = None if backend != "inductor" else "default"
    config = CompileConfig(**options)
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers' switch for compiling on any device
    return {"cache_implementation": "static", "compile_config": config}


@contextlib.contextmanager
def compile_budget(graphs: int) -> Iterator[None]:
    """Within the block, ``torch.compile`` keeps up to ``graphs`` compiled versions of one function (one
    per model compared), instead of silently falling back to eager past its default limit (8)."""
    config = torch._dynamo.config
    names = [
        n
        for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit")
        if hasattr(config, n)
    ]
    saved = {n: getattr(config, n) for n in names}
    try:
        for n in names:
            setattr(config, n, max(saved[n], graphs))
        yield
    finally:
        for n, value in saved.items():
            setattr(config, n, value)


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
    mode: str = "eager",
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
        mode: ``eager`` or ``compiled`` (:func:`generate_kwargs`).
    """
    original = current_plan(model)
    try:
        targets = {name: (model, functools.partial(apply_plan, model, plan)) for name, plan in plans.items()}
        return _measure(targets, inputs, new_tokens, repeats, warmup, progress, mode)
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
    mode: str = "eager",
    backend: str = "inductor",
) -> dict[str, PlanTiming]:
    """:func:`measure_plans` for several models as they are (e.g. unmerged adapters vs merged weights).

    Each model's timing carries the plan it runs (:func:`~skipvlm.runtime.current_plan`).
    """
    targets = {n: (m, None) for n, m in models.items()}
    return _measure(targets, inputs, new_tokens, repeats, warmup, progress, mode, backend)


def _measure(
    targets: Mapping[str, tuple[nn.Module, Callable[[], Any] | None]],
    inputs: Mapping[str, torch.Tensor],
    new_tokens: int,
    repeats: int,
    warmup: int,
    progress: bool,
    mode: str = "eager",
    backend: str = "inductor",
) -> dict[str, PlanTiming]:
    """Time prefill, generate(1) and generate(n) of every (model, untimed setup) target, interleaved."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 to time decoding, got {new_tokens}")
    device = next(next(iter(targets.values()))[0].parameters()).device
    extra = generate_kwargs(mode, device, backend)
    length = int(inputs["input_ids"].shape[1]) + new_tokens

    def generate(model: nn.Module, n: int) -> Callable[[], Any]:
        return lambda: model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            return_dict_in_generate=True,
            **extra,
        )

    def prefill(model: nn.Module) -> Callable[[], Any]:
        # logits for the last position only, as `generate` asks for them; into the mode's kind of cache
        if mode == "eager":
            return functools.partial(model, **inputs, use_cache=True, logits_to_keep=1)
        config = model.config.get_text_config(decoder=True)
        return lambda: model(
            **inputs,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs(StaticCache(config=config, max_cache_len=length)),
        )

    fns: dict[str, Callable[[], Any]] = {}
    setup: dict[str, Callable[[], Any]] = {}
    for name, (model, prepare) in targets.items():
        fns[f"{name}/prefill"] = prefill(model)
        fns[f"{name}/gen1"] = generate(model, 1)
        fns[f"{name}/genN"] = generate(model, new_tokens)
        if prepare is not None:  # e.g. switching plans: not part of what is timed
            setup |= {f"{name}/{part}": prepare for part in ("prefill", "gen1", "genN")}
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


@torch.no_grad()
def peak_memory(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], new_tokens: int, **generate_kwargs: Any
) -> int | None:
    """Peak device memory of one ``generate`` on CUDA: the model's weights plus the most the call held
    above what was allocated before it (cache, activations); other models on the device are not counted.
    ``None`` on other devices.

    ``generate_kwargs``: e.g. the compiled mode's (:func:`generate_kwargs`)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model.generate(
        **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **generate_kwargs
    )
    torch.cuda.synchronize(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + torch.cuda.max_memory_allocated(device) - before
