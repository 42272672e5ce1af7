"""The ``skipvlm`` command line. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from skipvlm import __version__


def _cmd_demo(args: argparse.Namespace) -> int:
    from skipvlm.bench import timing_table
    from skipvlm.io import atomic_write_text
    from skipvlm.showcase import ShowcaseConfig, run_showcase

    cfg = ShowcaseConfig(new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed)
    print(
        "skipvlm demo: the skip runtime on a LLaVA-shaped model with random weights "
        f"(C={cfg.hidden_size}, L={cfg.num_layers}); timings are interleaved medians "
        f"over {cfg.repeats} rounds."
    )
    result = run_showcase(cfg)
    print(
        f"prompt: {result['prompt_tokens']} tokens, {result['image_tokens']} of them visual; "
        f"{result['threads']} CPU threads"
    )
    print(f"cached generation == full recompute under a skip plan: {result['cached_equals_recompute']}")
    print()
    print(timing_table(result["rows"]))
    print()
    print("x = speedup (or KV ratio) against the stock model. Skipped attentions hold no KV cache.")
    if args.out:
        path = atomic_write_text(Path(args.out) / "showcase.json", json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    print(f"done in {result['seconds']:.1f}s")
    return 0 if result["cached_equals_recompute"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipvlm",
        description="Skip redundant attention in multimodal LLMs and measure what it buys.",
    )
    parser.add_argument("--version", action="version", version=f"skipvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="show the skip runtime end to end on a small model")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timing (default 16)")
    demo.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder to write showcase.json into")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"skipvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
