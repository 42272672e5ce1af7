"""``skipvlm cost`` and ``bench``: the analytic MACs of a plan, and measured latency / KV cache against
the alternatives, for a preset architecture or a local checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from skipvlm.cli import loading
from skipvlm.cli.options import (
    SKIP_COUNT,
    add_command,
    add_device_option,
    add_dtype_option,
    add_model_option,
    add_out_option,
    add_skip_options,
    add_token_exit_options,
    check_skip_count,
    check_skip_layers,
    count,
    parse_counts,
    plan_from_args,
    positive_int,
    refuse_option,
)


def _skip_plan(args: argparse.Namespace, num_layers: int) -> Any:
    """The plan of ``--skip-attention`` (layers) or ``--skip-attention-count`` (that many attentions, in
    the benchmark's pattern), ``--skip-mlp`` and the token-exit options."""
    from skipvlm.bench import skip_layers
    from skipvlm.plan import Plan

    check_skip_layers(args, num_layers)
    attention = list(args.skip_attention or [])
    if args.skip_attention_count is not None:
        check_skip_count(SKIP_COUNT, args.skip_attention_count, num_layers)
        attention = skip_layers(num_layers, args.skip_attention_count)
    skips = Plan(skip_attention=attention, skip_mlp=list(args.skip_mlp or []))
    plan = plan_from_args(args, skips)
    plan.validate_for(num_layers)
    return plan


def _preset_or_model(args: argparse.Namespace, device: str = "meta") -> tuple[str, Any]:
    """The name and model of ``--preset`` or ``--model``: built on ``device`` (``meta``: no weights)."""
    import torch

    from skipvlm import presets

    dtype = getattr(torch, args.dtype)  # the --dtype choices are torch dtype names
    if bool(args.preset) == bool(args.model):
        raise ValueError("pass exactly one of --preset NAME or --model DIR")
    if args.preset:
        return args.preset, presets.build(args.preset, device=device, dtype=dtype)
    folder = loading.check_model_dir(args.model)
    if device == "meta":
        return folder.name, presets.build(loading.model_config(folder), device="meta", dtype=dtype)
    return folder.name, loading.load_model(folder, args)


def _cmd_cost(args: argparse.Namespace) -> int:
    from skipvlm.arch import arch_facts, encoder_host
    from skipvlm.cost import CONVENTIONS, count_macs
    from skipvlm.io import atomic_write_text

    name, model = _preset_or_model(args)
    if encoder_host(model) is not None:
        from skipvlm.encoders.cli import encoder_cost

        return encoder_cost(args, name, model)
    if args.skip_sublayers:
        raise ValueError(
            "--skip-sublayers names sublayers of a two-stream encoder (BridgeTower); a decoder takes "
            "--skip-attention / --skip-mlp layer indices"
        )
    if args.text_tokens is not None:
        raise ValueError(
            "--text-tokens is the text length of a BridgeTower model; a decoder takes --prompt-tokens"
        )
    facts = arch_facts(model)
    plan = _skip_plan(args, facts.num_layers)
    shown = args.convention or "full"
    reports = {
        convention: (
            count_macs(model, args.prompt_tokens, images=args.images, convention=convention),
            count_macs(model, args.prompt_tokens, plan, images=args.images, convention=convention),
        )
        for convention in ([args.convention] if args.convention else CONVENTIONS)
    }
    base, cost = reports[shown]
    print(
        f"{name}: {facts.num_layers} layers, C={facts.hidden_size}, prompt {args.prompt_tokens} tokens; "
        f"{plan}; MACs in the {shown!r} convention"
    )
    print(f"{'module':<14}{'stock GMACs':>14}{'plan GMACs':>14}")
    for label in ("attention", "mlp", "vision", "projector", "lm_head"):
        print(f"{label:<14}{getattr(base, label) / 1e9:>14.1f}{getattr(cost, label) / 1e9:>14.1f}")
    print(f"{'total':<14}{base.total / 1e9:>14.1f}{cost.total / 1e9:>14.1f}")
    for convention, (stock, planned) in reports.items():
        removed = stock.total - planned.total
        print(
            f"the plan removes {removed / 1e9:.1f} of {stock.total / 1e9:.1f} GMACs = "
            f"{100 * removed / stock.total:.1f}% ({convention!r} convention: {_CONVENTION_HELP[convention]})"
        )
    if args.out:
        data = {
            "model": name,
            "convention": shown,
            "stock": base.to_dict(),
            "plan": cost.to_dict(),
            "removed_share": (base.total - cost.total) / base.total,
            "removed_share_by_convention": {
                convention: (stock.total - planned.total) / stock.total
                for convention, (stock, planned) in reports.items()
            },
        }
        path = atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


_CONVENTION_HELP = {
    "full": "with the attention's N^2 score / value terms",
    "paper": "without them, as the EAS paper counts",
}


def _bench_inputs(model: Any, facts: Any, prompt_tokens: int, device: Any, batch: int = 1) -> dict:
    """A random, left-padded batch of ``batch`` prompts of at most ``prompt_tokens`` tokens; for LLaVA one
    image (random pixels) per prompt, at a different position in each.

    Row ``r`` has ``r * P // batch`` padding tokens on the left, ``P`` the least of a quarter of the
    length and the room the image leaves, and its image after ``1 + r`` text tokens; a batch of one is
    one unpadded prompt with the image after the first text token.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(facts.vocab_size, 30000), (batch, prompt_tokens), generator=gen)
    mask = torch.ones_like(ids)
    image_tokens = 0
    if facts.model_type == "llava":
        vision = model.config.vision_config
        image_tokens = (vision.image_size // vision.patch_size) ** 2
    room = (
        prompt_tokens // 4
        if not image_tokens
        else min(prompt_tokens // 4, prompt_tokens - image_tokens - batch - 1)
    )
    pads = [r * max(room, 0) // batch for r in range(batch)]
    for r, pad in enumerate(pads):
        ids[r, :pad], mask[r, :pad] = 0, 0
    inputs = {"input_ids": ids}
    if image_tokens:
        ids[ids == facts.image_token_id] = 3  # random text never holds the image token
        for r, pad in enumerate(pads):
            start = pad + 1 + r
            if start + image_tokens + 1 > prompt_tokens:
                raise ValueError(
                    f"--prompt-tokens {prompt_tokens} leaves too little room for the {image_tokens} image "
                    f"tokens of one image in row {r} of a batch of {batch}; raise --prompt-tokens"
                )
            ids[r, start : start + image_tokens] = facts.image_token_id
        size = vision.image_size
        pixels = torch.randn(batch, 3, size, size, generator=gen)
        inputs["pixel_values"] = pixels.to(next(model.parameters()).dtype)
    inputs["attention_mask"] = mask
    return {k: v.to(device) for k, v in inputs.items()}


def _bench_meta(args: argparse.Namespace, name: str, device: Any) -> dict:
    """What a bench result was measured on: model, the run's machine and versions, options."""
    from skipvlm.runinfo import run_info

    options = {k: str(v) for k, v in vars(args).items() if k != "func"}
    return {"model": name, **run_info(device, args.dtype), "args": options}


def _batch_sizes(text: str) -> list[int]:
    """``--batch-size``: comma-separated batch sizes of 1 or more."""
    sizes = parse_counts(text)
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be 1 or more, got {text!r}")
    return sizes


def _check_backend(name: str) -> None:
    """Refuse an unknown ``--compile-backend`` before anything is timed."""
    import torch

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(
            f"--compile-backend {name!r} is not a torch.compile backend; choose from "
            f"{', '.join(torch._dynamo.list_backends())}"
        )


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from skipvlm.arch import arch_facts
    from skipvlm.bench import TokenExitRows, bench_table, run_bench
    from skipvlm.io import atomic_write_text

    device = loading.device(args)
    if args.compile:
        _check_backend(args.compile_backend)
    name, model = _preset_or_model(args, device=str(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = arch_facts(model)
    if facts.model_type not in ("llama", "mistral", "qwen2", "llava"):
        raise ValueError(
            f"skipvlm bench builds prompts for Llama / Mistral / Qwen2 / LLaVA, not {facts.model_type}"
        )
    for k in [*args.skip_attention_counts, *(args.eas_vtw_counts or [])]:
        check_skip_count("--skip-attention-counts", k, facts.num_layers)
    methods = [m for m in args.methods.split(",") if m]
    if not methods:
        raise ValueError(f"--methods {args.methods!r} names no method; pass e.g. --methods stock,eas")
    exits = TokenExitRows(
        vtw_layer=args.vtw_layer,
        fastv_layer=args.fastv_layer,
        fastv_ratio=args.fastv_ratio,
        eas_vtw_counts=tuple(args.eas_vtw_counts or ()),
    )
    batches = {b: _bench_inputs(model, facts, args.prompt_tokens, device, b) for b in args.batch_size}
    modes = ["eager", "compiled"] if args.compile else ["eager"]
    out = Path(args.out or Path("benchmarks/results") / f"bench_{name}_{device.type}.json")
    meta = _bench_meta(args, name, device)

    done: list[dict] = []

    def save_partial(rows: list[dict], error: str | None = None) -> None:
        # Written after every batch size and mode: a run that fails or is stopped keeps what it timed.
        done[:] = rows
        partial = {"rows": rows, "partial": True, "error": error, "meta": meta}
        atomic_write_text(out, json.dumps(partial, indent=1) + "\n")

    try:
        rows = run_bench(
            model,
            _bench_inputs(model, facts, args.prompt_tokens, device),
            args.skip_attention_counts,
            methods,
            args.new_tokens,
            args.repeats,
            progress=True,
            batches=batches,
            modes=modes,
            exits=exits,
            backend=args.compile_backend,
            on_rows=save_partial,
        )
    except Exception as err:
        if done:
            save_partial(done, f"{type(err).__name__}: {err}")
            print(f"wrote the {len(done)} rows timed before the error to {out} (partial)")
        raise
    print(
        f"{name} on {device} ({args.dtype}), prompt {args.prompt_tokens} (left-padded batches), "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, medians of {args.repeats} "
        "interleaved rounds"
    )
    print(bench_table(rows))
    print(
        "x: speedup against stock (same batch size B and mode); bound: what the removed MACs (prefill) or "
        "bytes read per step (decode) allow; of: measured / bound; tok/s: the batch's decoded tokens/s; "
        "eager: dynamic cache; compiled: static cache + torch.compile'd decoding step"
    )
    summary = _bench_summary(rows)
    for line in summary["lines"]:
        print(line)
    result = {"rows": rows, "summary": summary["values"], "meta": meta}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    first = [r for r in rows if r["batch_size"] == min(args.batch_size) and r["mode"] == "eager"]
    try:
        from skipvlm.plots import plot_speedups

        plot_speedups(first, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
    except ImportError as err:  # a bare serving machine may lack matplotlib: the JSON is what counts
        print(f"wrote {out} (no plot: {err})")
    return 0


def _bench_summary(rows: list[dict]) -> dict:
    """The targets a serving benchmark checks, from its rows: merged EAS keeps its speedup at the larger
    batch; compiled merged EAS reaches its decode bound; the LaVIN-vs-EAS comparison."""
    from skipvlm.bench import ratio

    lines, values = [], {}
    largest = max(r["batch_size"] for r in rows)
    for r in rows:
        if r["name"].startswith("eas k=") and "(merged)" in r["name"] and r["skipped_attentions"]:
            key = f"{r['name']} B={r['batch_size']} {r['mode']}"
            if r["batch_size"] == largest and largest > min(x["batch_size"] for x in rows):
                values[f"{key}: speedup kept vs batch 1"] = r["speedup_kept_vs_batch1"]
                lines.append(
                    f"{key}: keeps {100 * r['speedup_kept_vs_batch1']:.0f}% of its batch-1 decode speedup"
                )
            if r["mode"] == "compiled":
                values[f"{key}: decode of bound"] = r["decode_of_bound"]
                lines.append(
                    f"{key}: decode {r['decode_speedup']:.2f}x of a {r['decode_bound']:.2f}x bound "
                    f"({100 * r['decode_of_bound']:.0f}%)"
                )
    lavin = {(r["batch_size"], r["mode"]): r for r in rows if r["name"] == "lavin (unmerged)"}
    for r in rows:
        twin = lavin.get((r["batch_size"], r["mode"]))
        if twin is not None and r["name"].startswith("eas k=") and r["name"].endswith("(merged)"):
            key = f"{r['name']} vs lavin (unmerged) B={r['batch_size']} {r['mode']}"
            e2e = ratio(twin["generate_ms"], r["generate_ms"])  # NaN where noise measured 0
            decode = ratio(twin["decode_ms_per_token"], r["decode_ms_per_token"])
            values[f"{key}: generate speedup"], values[f"{key}: decode speedup"] = e2e, decode
            lines.append(f"{key}: generate {e2e:.2f}x, decode {decode:.2f}x faster (EAS paper: 2.18x)")
    return {"lines": lines, "values": values}


def _add_target(parser: argparse.ArgumentParser) -> None:
    """What cost and bench measure: a preset or a checkpoint, a prompt length, a dtype, an output file."""
    parser.add_argument("--preset", help="a preset architecture (skipvlm.presets.names())")
    add_model_option(parser, required=False, help="or a local checkpoint folder")
    parser.add_argument("--prompt-tokens", type=positive_int, default=512)
    add_dtype_option(parser)
    add_out_option(parser, "JSON file to write", overwrite=False)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``cost`` and ``bench`` to the ``skipvlm`` parser."""
    cost = add_command(sub, "cost", "analytic MACs per module for a plan (presets need no weights)")
    _add_target(cost)
    one_of = cost.add_mutually_exclusive_group()
    add_skip_options(one_of, ("skip_attention",))
    one_of.add_argument(
        SKIP_COUNT,
        type=count,
        help="or skip this many attentions, the benchmark's pattern: odd layers first, then even ones "
        "from the top",
    )
    add_skip_options(cost, ("skip_mlp",))
    cost.add_argument("--images", type=count, default=None, help="images in the prompt (default 1 for VLMs)")
    cost.add_argument(
        "--skip-sublayers",
        default=None,
        help="BridgeTower only: skipped sublayers by name, comma-separated (text.1.cross,image.0.ffn)",
    )
    cost.add_argument(
        "--text-tokens",
        type=positive_int,
        default=None,
        help="BridgeTower only: text tokens (default 40; --prompt-tokens is the decoders')",
    )
    cost.add_argument(
        "--convention",
        choices=("full", "paper"),
        default=None,
        help="MACs convention: 'full' counts the attention's N^2 score / value terms, 'paper' leaves them "
        "out as the EAS paper does (default: the table in 'full', the removed share in both)",
    )
    add_token_exit_options(cost, per_example=False)  # DyVTE's exit depends on the data
    cost.set_defaults(func=_cmd_cost)

    bench = add_command(
        sub,
        "bench",
        "latency / KV cache of stock, LoRA, PIA, LaVIN, merged EAS and token exit, batched, eager or "
        "compiled, with roofline bounds",
    )
    _add_target(bench)
    bench.add_argument(
        "--skip-attention-counts",
        type=parse_counts,
        default=[0, 4, 6],
        help="numbers of attentions EAS skips, one row each, in the pattern of --skip-attention-count on "
        "cost (default 0,4,6)",
    )
    for option in ("--skip-attention", "--skip"):
        refuse_option(
            bench, option, "pass --skip-attention-counts 0,4,6 (attentions EAS skips, one row each)"
        )
    bench.add_argument(
        "--methods",
        default="stock,lora,pia,eas",
        help="stock, lora, pia, lavin, eas, skip, vtw, fastv, eas+vtw (token exit: LLaVA only)",
    )
    bench.add_argument("--new-tokens", type=int, default=32)
    bench.add_argument("--repeats", type=positive_int, default=7)
    bench.add_argument("--threads", type=count, default=0, help="torch threads (0: default)")
    bench.add_argument(
        "--batch-size",
        type=_batch_sizes,
        default=[1],
        help="batch sizes, one set of rows each (e.g. 1,8): left-padded prompts, images at different places",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also time each model with a static cache and a torch.compile'd decoding step (token-exit "
        "rows stay eager)",
    )
    bench.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend for --compile (default inductor; eager / aot_eager only trace)",
    )
    bench.add_argument("--vtw-layer", type=count, default=16, help="vtw rows: withdraw before layer K")
    bench.add_argument("--fastv-layer", type=count, default=2, help="fastv rows: layer K")
    bench.add_argument("--fastv-ratio", type=float, default=0.5, help="fastv rows: share R dropped")
    bench.add_argument(
        "--eas-vtw-counts",
        type=parse_counts,
        default=None,
        help="eas+vtw rows: skipped attentions (default: each count > 0 of --skip-attention-counts)",
    )
    add_device_option(bench)
    bench.set_defaults(func=_cmd_bench)
