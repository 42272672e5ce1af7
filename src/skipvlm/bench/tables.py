"""Timings as results: JSON-ready rows with ratios against a baseline, and fixed-width text tables.

:func:`timing_rows` turns :class:`~skipvlm.bench.timing.PlanTiming` medians into rows (ms, tokens/s,
speedups and KV ratio against the baseline); :func:`timing_table` and :func:`bench_table` print them,
the latter with the roofline columns :func:`~skipvlm.bench.compare.run_bench` adds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from skipvlm.bench.timing import PlanTiming, ratio

__all__ = ["bench_table", "format_rows", "timing_rows", "timing_table"]


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


def bench_table(rows: list[dict[str, Any]]) -> str:
    """Medians, speedups against the stock model, and the roofline bounds, side by side; with the batch
    size, the mode and the batch's tokens/s where the rows carry them."""
    served = [
        ("B", 4, lambda r: str(r.get("batch_size", ""))),
        ("mode", 10, lambda r: " " + str(r.get("mode", "")), "<"),
    ]
    return format_rows(
        rows,
        [
            ("method", 24, lambda r: r["name"]),
            *(served if any("mode" in r for r in rows) else []),
            ("prefill ms", 11, lambda r: f"{r['prefill_ms']:.2f}"),
            ("x", 6, lambda r: f"{r['prefill_speedup']:.2f}"),
            ("bound", 7, lambda r: f"{r['prefill_bound']:.2f}"),
            ("of", 6, lambda r: f"{100 * r['prefill_of_bound']:.0f}%"),
            ("decode ms/tok", 15, lambda r: f"{r['decode_ms_per_token']:.2f}"),
            ("x", 6, lambda r: f"{r['decode_speedup']:.2f}"),
            ("bound", 7, lambda r: f"{r['decode_bound']:.2f}"),
            ("of", 6, lambda r: f"{100 * r['decode_of_bound']:.0f}%"),
            ("tok/s", 9, lambda r: f"{r.get('batch_tokens_per_s', r['decode_tokens_per_s']):.1f}"),
            ("KV MiB", 8, lambda r: f"{r['kv_cache_bytes'] / 2**20:.2f}"),
        ],
    )
