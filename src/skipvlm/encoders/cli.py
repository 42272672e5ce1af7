"""The command-line side of the encoder host: ``skipvlm cost`` on a BridgeTower preset or checkpoint
(the per-module MAC table, METHODS §5, §7) and ``skipvlm demo --host bridgetower``. Prints; the library
modules do not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from skipvlm.plan import Plan

__all__ = ["demo_main", "encoder_cost"]

# The EAS paper's METER row, as the issue quotes it: EAS skipping 8 / 12 attention modules removes 8.0 % /
# 12.0 % more of the FLOPs than DAS.
PAPER_METER = {8: 0.080, 12: 0.120}
DEFAULT_TEXT_TOKENS = 40  # a VQAv2 question with BridgeTower's tokenizer and special tokens fits


def _plan(args: argparse.Namespace) -> Plan:
    """The plan of ``--skip-sublayers``; the decoders' options are refused, not ignored (token-exit options
    reach the plan, which the host refuses with its reason)."""
    from skipvlm.cli.options import plan_from_args

    if args.skip_attention or args.skip_mlp or args.skip_attention_count is not None:
        raise ValueError(
            "a BridgeTower plan names sublayers: pass --skip-sublayers text.1.cross,image.0.self,text.2.ffn "
            "instead of --skip-attention / --skip-mlp / --skip-attention-count layer indices"
        )
    if args.images is not None:
        raise ValueError("a BridgeTower forward takes one image (its image stream); drop --images")
    names = [n.strip() for n in (args.skip_sublayers or "").split(",") if n.strip()]
    skips = Plan(
        skip_attention=[n for n in names if not n.endswith(".ffn")],
        skip_mlp=[n for n in names if n.endswith(".ffn")],
    )
    return plan_from_args(args, skips)


def encoder_cost(args: argparse.Namespace, name: str, model: Any) -> int:
    """``skipvlm cost`` for a BridgeTower model: modules, sublayers, the plan, EAS k / DAS shares."""
    from skipvlm.encoders.cost import count_encoder_macs, das_share, plan_shares, sublayer_macs
    from skipvlm.io import atomic_write_text

    config = model.config
    plan = _plan(args)
    t = DEFAULT_TEXT_TOKENS if args.text_tokens is None else args.text_tokens
    paper = getattr(args, "convention", None) == "paper"  # the table's convention; shares print in both
    base = count_encoder_macs(config, t, paper=paper)
    cost = count_encoder_macs(config, t, plan, paper=paper)
    print(
        f"{name}: {config.num_hidden_layers} co-attention layers, C={config.hidden_size}; {t} text tokens, "
        f"{base.image_tokens} image tokens ({config.vision_config.image_size} px); {plan}; MACs in the "
        f"{'paper' if paper else 'full'!r} convention"
    )
    print(f"{'module':<22}{'stock GMACs':>14}{'plan GMACs':>14}{'share':>9}")
    for label, value in base.modules.items():
        print(
            f"{label:<22}{value / 1e9:>14.2f}{cost.modules[label] / 1e9:>14.2f}"
            f"{100 * value / base.total:>8.1f}%"
        )
    print(
        f"{'co-attention layers':<22}{base.co_attention / 1e9:>14.2f}{cost.co_attention / 1e9:>14.2f}"
        f"{100 * base.co_attention / base.total:>8.1f}%"
    )
    print(f"{'total':<22}{base.total / 1e9:>14.2f}{cost.total / 1e9:>14.2f}")
    removed = base.total - cost.total
    print(f"the plan removes {removed / 1e9:.2f} GMACs = {100 * removed / base.total:.1f}% of the total")
    print()
    print("one sublayer of each co-attention layer (GMACs, share of the total; full / paper convention):")
    paper_base = count_encoder_macs(config, t, paper=True).total
    full, paper = sublayer_macs(config, t), sublayer_macs(config, t, paper=True)
    for key in ("text.0.self", "text.0.cross", "text.0.ffn", "image.0.self", "image.0.cross", "image.0.ffn"):
        label = key.replace(".0.", " ")
        print(
            f"  {label:<14}{full[key] / 1e9:>8.2f} {100 * full[key] / base.total:>5.1f}%"
            f"   {paper[key] / 1e9:>8.2f} {100 * paper[key] / paper_base:>5.1f}%"
        )
    print()
    layers = config.num_hidden_layers
    shares: dict[str, Any] = {}
    for conv, is_paper in (("full", False), ("paper", True)):
        das = {n: das_share(config, t, n, is_paper) for n in (1, 2)}
        eas = {k: plan_shares(config, t, k, is_paper) for k in (8, 12) if k <= 4 * layers}
        shares[conv] = {"das_layers": das, "eas_k": eas}
        print(f"{conv} convention: DAS 1 / 2 layers remove {100 * das[1]:.1f}% / {100 * das[2]:.1f}%")
        for k, s in eas.items():
            print(
                f"  EAS{k}: {100 * s['min']:.1f}% (the {k} cheapest attentions) .. {100 * s['mean']:.1f}% "
                f"(mean over all choices) .. {100 * s['max']:.1f}% (the {k} most expensive); the paper's "
                f"METER: {100 * PAPER_METER[k]:.1f}% more than DAS"
            )
    if args.out:
        data = {
            "model": name,
            "stock": base.to_dict(),
            "plan": cost.to_dict(),
            "removed_share": removed / base.total,
            "shares": shares,
        }
        path = atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def demo_main(args: argparse.Namespace) -> int:
    """``skipvlm demo --host bridgetower``."""
    from skipvlm.encoders.demo import EncoderDemoConfig, format_table, run_encoder_demo

    kw = {"seed": args.seed} | ({"model": args.model} if args.model else {})
    config = EncoderDemoConfig.quick_config(**kw) if args.quick else EncoderDemoConfig(**kw)
    out = Path(args.out)
    if config.quick:
        print("skipvlm demo --host bridgetower --quick: a smoke run with less data, not a result.")
    print(
        f"skipvlm demo --host bridgetower: adapting the toy BridgeTower ({config.model}) to question "
        f"families it was not trained on; {config.train_examples} training examples, {config.epochs} "
        f"epochs, seed {config.seed}. Every method gets the same data, steps and seed."
    )
    result = run_encoder_demo(config, out=out, progress=not args.no_progress)
    print()
    print(format_table(result))
    print()
    meta = result["meta"]
    print(
        f"accuracy on {config.test_examples} test questions; MMACs of one forward ({meta['text_tokens']} "
        f"text + {meta['image_tokens']} image tokens, encoders included); latency: batch 1, median of "
        f"{config.repeats} interleaved rounds on {meta['threads']} CPU threads."
    )
    print(f"wrote {out / 'results.json'}")
    print(f"done in {meta['seconds'] / 60:.1f} min")
    return 0
