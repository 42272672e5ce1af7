"""Skip-runtime benchmark: half the attentions skipped vs none, on a Llama-shaped model (random weights).

Speed does not depend on trained weights, so a random model times like a trained one. Prints the
interleaved medians, the ratios against the stock model and the KV-cache bytes, and writes JSON to
benchmarks/results/. Run: `make bench` or `.venv/bin/python benchmarks/skip_runtime.py --help`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import transformers as tf

import skipvlm
from skipvlm.bench import measure_plans, timing_rows, timing_table
from skipvlm.io import atomic_write_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "skip_runtime_cpu.json")
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
    model = tf.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, args.vocab, (1, args.prompt))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    half = list(range(1, args.layers, 2))  # every other layer, keeping layer 0
    plans = {"none": skipvlm.Plan(), f"skip {len(half)} attn": skipvlm.Plan(skip_attention=half)}
    res = measure_plans(model, inputs, plans, new_tokens=args.new_tokens, repeats=args.repeats, progress=True)

    print(
        f"Llama-shaped C={args.hidden} L={args.layers} F={args.ffn} V={args.vocab}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds"
    )
    rows = timing_rows(res, baseline="none")
    print(timing_table(rows))
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
