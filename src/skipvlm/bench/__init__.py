"""Latency, KV-cache and memory measurement, and the method comparison of `skipvlm bench`.

* :mod:`~skipvlm.bench.timing`: the primitives (interleaved rounds, synchronised perf_counter,
  medians of prefill / decode per token / KV bytes, CUDA peak memory);
* :mod:`~skipvlm.bench.methods`: the models compared (stock, LoRA, unmerged PIA, LaVIN, merged EAS,
  skip, VTW, FastV, EAS + VTW);
* :mod:`~skipvlm.bench.tables`: JSON-ready rows with ratios against a baseline, text tables;
* :mod:`~skipvlm.bench.compare`: :func:`run_bench`, the comparison with its roofline columns, per batch
  size and mode (eager / compiled).

Every public name is importable from ``skipvlm.bench``.
"""

from skipvlm.bench.compare import decode_step_bytes, run_bench
from skipvlm.bench.methods import (
    METHODS,
    TokenExitRows,
    adapter_macs_per_token,
    bench_models,
    lora_model,
    random_adapters,
    skip_layers,
)
from skipvlm.bench.tables import bench_table, format_rows, timing_rows, timing_table
from skipvlm.bench.timing import (
    MODES,
    PlanTiming,
    compile_budget,
    generate_kwargs,
    interleaved,
    measure_models,
    measure_plans,
    peak_memory,
    ratio,
    synchronize,
)

__all__ = [
    "METHODS",
    "MODES",
    "PlanTiming",
    "TokenExitRows",
    "adapter_macs_per_token",
    "bench_models",
    "bench_table",
    "compile_budget",
    "decode_step_bytes",
    "format_rows",
    "generate_kwargs",
    "interleaved",
    "lora_model",
    "measure_models",
    "measure_plans",
    "peak_memory",
    "random_adapters",
    "ratio",
    "run_bench",
    "skip_layers",
    "synchronize",
    "timing_rows",
    "timing_table",
]
