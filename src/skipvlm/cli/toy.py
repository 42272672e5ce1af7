"""``skipvlm showcase``, ``demo`` and ``toy``: what runs with no checkpoint or data of one's own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from skipvlm.cli.options import add_command, add_model_option, add_out_option, positive_int


def _cmd_showcase(args: argparse.Namespace) -> int:
    from skipvlm.bench import timing_table
    from skipvlm.io import atomic_write_text
    from skipvlm.showcase import ShowcaseConfig, run_showcase

    cfg = ShowcaseConfig(new_tokens=args.new_tokens, repeats=args.repeats, seed=args.seed)
    print(
        "skipvlm showcase: the skip runtime on a LLaVA-shaped model with random weights "
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


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.host == "bridgetower":
        from skipvlm.encoders.cli import demo_main

        return demo_main(args)
    from skipvlm.demo import DemoConfig, format_table, run_demo
    from skipvlm.toy import DOWNSTREAM_FAMILIES

    kw = {"seed": args.seed} | ({"model": args.model} if args.model else {})
    config = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    out = Path(args.out)
    if config.quick:
        print(
            "skipvlm demo --quick: a smoke run with less data and fewer steps; its numbers are not a result."
        )
    print(
        f"skipvlm demo: adapting the toy LLaVA ({config.model}) to question families it was not trained "
        f"on ({', '.join(DOWNSTREAM_FAMILIES)}); {config.train_examples} training examples, {config.epochs} "
        f"epochs, seed {config.seed}. Every method gets the same data, steps and seed."
    )
    result = run_demo(config, out=out, progress=not args.no_progress)
    print()
    print(format_table(result))
    print()
    meta = result["meta"]
    print(
        f"accuracy on {config.test_examples} test questions; GMACs of one prefill "
        f"({meta['prompt_tokens']} tokens, vision tower included); latency: batch 1, "
        f"{config.new_tokens} decoded tokens, medians of {config.repeats} interleaved rounds on "
        f"{meta['threads']} CPU threads."
    )
    print(f"wrote {out / 'results.json'}, {out / 'accuracy_vs_decode.png'}, {out / 'preferences.png'}")
    print(f"done in {meta['seconds'] / 60:.1f} min")
    return 0


def _cmd_toy_pretrain(args: argparse.Namespace) -> int:
    if args.host == "bridgetower":
        from skipvlm.encoders.toy import pretrain_bridgetower as pretrain
    else:
        from skipvlm.toy import pretrain

    steps, lr = args.steps or _PRETRAIN[args.host][0], args.lr or _PRETRAIN[args.host][1]
    info = pretrain(args.out, steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed)
    accuracy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in info["val_accuracy"].items())
    print(f"pretrained the toy model in {info['seconds'] / 60:.1f} min -> {args.out}")
    print(f"validation accuracy: {accuracy}")
    return 0


def _cmd_toy_data(args: argparse.Namespace) -> int:
    from skipvlm.toy import write_task_data

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    files = write_task_data(args.out, sizes, seed=args.seed)
    print(", ".join(f"{split}: {sizes[split]} examples -> {path}" for split, path in files.items()))
    return 0


def _cmd_toy_path(args: argparse.Namespace) -> int:
    from skipvlm.toy import SHIPPED

    print(SHIPPED)
    return 0


# Pretraining defaults per toy host: (steps, learning rate).
_PRETRAIN = {"llava": (6000, 2e-3), "bridgetower": (1200, 1e-3)}
HOSTS = tuple(_PRETRAIN)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``showcase`` and ``toy`` to the ``skipvlm`` parser."""
    demo = add_command(sub, "demo", "compare adaptation methods end to end on the bundled toy world")
    demo.add_argument("--quick", action="store_true", help="a smoke run in a few minutes (not a result)")
    add_out_option(
        demo, "folder for results.json and plots (default runs/demo)", default="runs/demo", overwrite=False
    )
    add_model_option(
        demo, required=False, help="toy checkpoint folder (default: the one shipped with skipvlm)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--host",
        choices=HOSTS,
        default="llava",
        help="llava: the decoder toy (default); bridgetower: the two-stream encoder toy (METER family)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    show = add_command(sub, "showcase", "time the skip runtime on a LLaVA-shaped model with random weights")
    show.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timing (default 16)")
    show.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    show.add_argument("--seed", type=int, default=0)
    add_out_option(show, "folder to write showcase.json into")
    show.set_defaults(func=_cmd_showcase)

    toy = add_command(sub, "toy", "the bundled toy model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pre = add_command(toy_sub, "pretrain", "build and pretrain a toy model (LLaVA or BridgeTower) on CPU")
    add_out_option(pre, "folder for the checkpoint", required=True)
    pre.add_argument("--host", choices=HOSTS, default="llava", help="llava (default) or bridgetower")
    pre.add_argument("--steps", type=int, default=None, help="default 6000 (llava), 1200 (bridgetower)")
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--lr", type=float, default=None, help="default 2e-3 (llava), 1e-3 (bridgetower)")
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=_cmd_toy_pretrain)

    dat = add_command(toy_sub, "data", "write the toy's task as JSON lines + images (to try the CLI)")
    add_out_option(dat, "folder for train.jsonl, val.jsonl, test.jsonl, images/", required=True)
    dat.add_argument("--train", type=positive_int, default=256, help="training examples (default 256)")
    dat.add_argument("--val", type=positive_int, default=64, help="held-out examples (default 64)")
    dat.add_argument("--test", type=positive_int, default=100, help="test examples (default 100)")
    dat.add_argument("--seed", type=int, default=0)
    dat.set_defaults(func=_cmd_toy_data)

    pth = add_command(toy_sub, "path", "print the folder of the bundled toy checkpoint")
    pth.set_defaults(func=_cmd_toy_path)
