"""What the CPU benchmarks share: a Llama-shaped model with random weights, its prompt, the results file.

Speed does not depend on trained weights, so a random model times like a trained one of its shape.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from skipvlm.io import atomic_write_text
from skipvlm.runinfo import run_info

RESULTS = Path(__file__).parent / "results"


def add_model_args(p: argparse.ArgumentParser, out_name: str) -> None:
    """Model shape, prompt and timing options shared by the benchmark scripts."""
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=RESULTS / out_name)


def llama_config(args: argparse.Namespace, positions: int) -> tf.LlamaConfig:
    """The Llama text config of the requested shape, with room for ``positions`` positions."""
    return tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=positions,
    )


def llama_and_prompt(args: argparse.Namespace) -> tuple[tf.LlamaForCausalLM, dict[str, torch.Tensor]]:
    """A seeded random Llama of the requested shape in eval mode, and a one-row prompt for it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(llama_config(args, args.prompt + args.new_tokens + 8)).eval()
    ids = torch.randint(3, args.vocab, (1, args.prompt))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def describe(args: argparse.Namespace) -> str:
    return (
        f"Llama-shaped C={args.hidden} L={args.layers} F={args.ffn} V={args.vocab}, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds"
    )


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """Write the rows with the machine, library versions and arguments that produced them."""
    # the models of these scripts are built on the CPU in torch's default dtype
    meta = {**run_info("cpu", torch.get_default_dtype()), "args": {k: str(v) for k, v in vars(args).items()}}
    atomic_write_text(args.out, json.dumps({"rows": rows, "meta": meta}, indent=2) + "\n")
    print(f"wrote {args.out}")
