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
import json
import platform
import time
from pathlib import Path

import torch
import transformers as tf

import skipvlm
from skipvlm.bench import measure_models, ratio, timing_rows, timing_table
from skipvlm.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--skip", type=int, default=6, help="attentions to skip (every other layer from 1)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eas_merge_cpu.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.prompt + args.new_tokens + 8,
    )
    base = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, args.vocab, (1, args.prompt))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    skip = list(range(1, args.layers, 2))[: args.skip]

    plain = skipvlm.apply_plan(copy.deepcopy(base), skipvlm.Plan(skip_attention=skip))
    unmerged = skipvlm.get_eas_model(copy.deepcopy(base), skipvlm.EASConfig(skip_attention=skip)).eval()
    with torch.no_grad():  # non-zero adapters, as after training
        for q in unmerged.adapters.parameters():
            q.normal_(0, 0.02)
    unmerged.calibrate([inputs], progress=False)
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

    print(
        f"Llama-shaped C={args.hidden} L={args.layers} F={args.ffn} V={args.vocab}, {len(skip)} attentions "
        f"skipped, prompt {args.prompt}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved rounds"
    )
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
    meta = {
        "machine": platform.machine(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    atomic_write_text(args.out, json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
