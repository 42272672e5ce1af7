"""Visual-token exit benchmark: VTW and FastV vs the stock model on a LLaVA-shaped model (random weights)
with 576 visual tokens per prompt, alone and with skipped attentions.

Prints, per plan, the measured prefill and decode latency ratios (interleaved medians), the analytic MACs
ratio of the prefill (``skipvlm.cost.count_macs``, vision tower included) and the KV-cache ratio, and
writes JSON to benchmarks/results/. Run: `make bench` or
`.venv/bin/python benchmarks/token_exit.py --help`.
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

import skipvlm
from skipvlm.bench import format_rows, measure_plans, skip_layers, timing_rows
from skipvlm.cost import count_macs

from common import add_model_args, llama_config, write_results

IMAGE_SIZE, PATCH = 336, 14  # CLIP-L/336's grid: 24 x 24 = 576 visual tokens


def llava_and_prompt(args: argparse.Namespace) -> tuple[tf.LlavaForConditionalGeneration, dict]:
    """A seeded random LLaVA of the requested text shape (a one-layer vision tower) and a one-image prompt."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    visual = (IMAGE_SIZE // PATCH) ** 2
    image_token = args.vocab - 1
    text = llama_config(args, visual + args.prompt + args.new_tokens + 8)
    vision = tf.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    config = tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=image_token, vision_feature_layer=-1
    )
    model = tf.LlavaForConditionalGeneration(config).eval()
    words = torch.randint(3, image_token, (args.prompt,))
    ids = torch.cat([words[:8], torch.full((visual,), image_token), words[8:]])[None]
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE),
    }
    return model, inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, "token_exit_cpu.json")
    p.set_defaults(prompt=64, new_tokens=16, repeats=5)
    args = p.parse_args()
    model, inputs = llava_and_prompt(args)
    n, half = inputs["input_ids"].shape[1], args.layers // 2
    skipped = skip_layers(args.layers, half)
    plans = {
        "stock": skipvlm.Plan(),
        f"vtw K={half}": skipvlm.Plan(visual_exit_layer=half),
        f"vtw K={args.layers // 4}": skipvlm.Plan(visual_exit_layer=args.layers // 4),
        "fastv K=2 R=0.5": skipvlm.Plan(fastv_layer=2, fastv_ratio=0.5),
        "fastv K=2 R=0.75": skipvlm.Plan(fastv_layer=2, fastv_ratio=0.75),
        f"skip {half} attn": skipvlm.Plan(skip_attention=skipped),
        f"skip {half} attn+vtw K={half}": skipvlm.Plan(skip_attention=skipped, visual_exit_layer=half),
    }
    res = measure_plans(model, inputs, plans, new_tokens=args.new_tokens, repeats=args.repeats, progress=True)
    rows = timing_rows(res, baseline="stock")
    stock_macs = count_macs(model, n).total
    for row, plan in zip(rows, plans.values(), strict=True):
        row["macs_ratio"] = count_macs(model, n, plan).total / stock_macs
    print(
        f"LLaVA-shaped C={args.hidden} L={args.layers} F={args.ffn} V={args.vocab}, {n}-token prompt "
        f"({n - args.prompt} visual), {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"{args.repeats} interleaved rounds"
    )
    print(
        format_rows(
            rows,
            [
                ("plan", 26, lambda r: r["name"]),
                ("prefill ms", 11, lambda r: f"{r['prefill_ms']:.1f}"),
                ("speedup", 9, lambda r: f"{r['prefill_speedup']:.2f}"),
                ("MACs ratio", 11, lambda r: f"{r['macs_ratio']:.3f}"),
                ("bound", 7, lambda r: f"{1 / r['macs_ratio']:.2f}"),
                ("decode x", 9, lambda r: f"{r['decode_speedup']:.2f}"),
                ("KV ratio", 9, lambda r: f"{r['kv_ratio']:.3f}"),
            ],
        )
    )
    write_results(args, rows)


if __name__ == "__main__":
    main()
