"""EAS adapter overhead: unmerged PIA branches and merged weights vs the plain skip, on a Llama-shaped model.

The question this answers (``shared/METHODS.md`` §2): once the adapters are folded into the weights,
does a tuned model run exactly as fast as the plain skipped model? Four models share the same random
base weights (speed does not depend on trained values): the stock model, the plain skip plan, the EAS
model with its adapters unmerged, and the same model after ``merge_and_unload("static")`` (and
``"per_example"``, which re-merges at every prefill). All are timed interleaved in one run; the ratios
against the plain skip are what to read. Run: ``.venv/bin/python benchmarks/eas_merge.py --help``.
"""

from __future__ import annotations

import argparse
import copy

import skipvlm
from skipvlm.bench import measure_models, random_adapters, ratio, timing_rows, timing_table

from common import add_model_args, describe, llama_and_prompt, write_results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, "eas_merge_cpu.json")
    p.add_argument(
        "--skip-attention-count", type=int, default=6, help="attentions to skip (every other layer from 1)"
    )
    args = p.parse_args()
    base, inputs = llama_and_prompt(args)
    skip = list(range(1, args.layers, 2))[: args.skip_attention_count]

    plain = skipvlm.apply_plan(copy.deepcopy(base), skipvlm.Plan(skip_attention=skip))
    # non-zero adapters, calibrated, as after training
    eas = skipvlm.get_eas_model(copy.deepcopy(base), skipvlm.EASConfig(skip_attention=skip))
    unmerged = random_adapters(eas, inputs)
    static = copy.deepcopy(unmerged).merge_and_unload("static")
    per_example = copy.deepcopy(unmerged).merge_and_unload("per_example")
    models = {
        "stock": base,
        "plain skip": plain,
        "EAS unmerged": unmerged,
        "EAS merged static": static,
        "EAS merged per_example": per_example,
    }
    res = measure_models(models, inputs, new_tokens=args.new_tokens, repeats=args.repeats, progress=True)

    print(f"{describe(args)}; {len(skip)} attentions skipped")
    rows = timing_rows(res, baseline="stock")
    print(timing_table(rows))
    ref = res["plain skip"]
    print("\nratios against the plain skip (1.00 = no overhead):")
    for row in rows:
        r = res[row["name"]]
        row["prefill_vs_plain_skip"] = ratio(r.prefill_s, ref.prefill_s)
        row["decode_vs_plain_skip"] = ratio(r.decode_s_per_token, ref.decode_s_per_token)
        print(
            f"  {row['name']:<24} prefill {row['prefill_vs_plain_skip']:.3f}   "
            f"decode {row['decode_vs_plain_skip']:.3f}"
        )
    write_results(args, rows)


if __name__ == "__main__":
    main()
