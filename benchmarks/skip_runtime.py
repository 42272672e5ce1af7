"""Skip-runtime benchmark: half the attentions skipped vs none, on a Llama-shaped model (random weights).

Speed does not depend on trained weights, so a random model times like a trained one. Prints the
interleaved medians, the ratios against the stock model and the KV-cache bytes, and writes JSON to
benchmarks/results/. Run: `make bench` or `.venv/bin/python benchmarks/skip_runtime.py --help`.
"""

from __future__ import annotations

import argparse

import skipvlm
from skipvlm.bench import measure_plans, timing_rows, timing_table

from common import add_model_args, describe, llama_and_prompt, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, "skip_runtime_cpu.json")
    args = p.parse_args()
    model, inputs = llama_and_prompt(args)
    half = list(range(1, args.layers, 2))  # every other layer, keeping layer 0
    plans = {"none": skipvlm.Plan(), f"skip {len(half)} attn": skipvlm.Plan(skip_attention=half)}
    res = measure_plans(model, inputs, plans, new_tokens=args.new_tokens, repeats=args.repeats, progress=True)
    print(describe(args))
    rows = timing_rows(res, baseline="none")
    print(timing_table(rows))
    write_results(args, rows)


if __name__ == "__main__":
    main()
