"""``skipvlm generate``, ``calibrate-vtw`` and ``train-dyvte``: the inference-side subcommands.

Kept apart from :mod:`skipvlm.cli` (which registers them) because they share the plan options: any
skip plan, with or without adapters, plus one visual-token exit method (``shared/METHODS.md`` §4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["check_token_flags", "register"]


def check_token_flags(tokens: dict[str, Any], plan: Any = None) -> None:
    """Refuse token-exit options that would be ignored: a FastV ratio or source without a FastV layer,
    a DyVTE threshold without routers (in the options or in ``plan``)."""
    for option, needs in (
        ("fastv_ratio", "fastv_layer"),
        ("fastv_source", "fastv_layer"),
        ("dyvte_threshold", "dyvte"),
    ):
        if option in tokens and tokens.get(needs) is None and getattr(plan, needs, None) is None:
            raise ValueError(
                f"--{option.replace('_', '-')} has no effect without --{needs.replace('_', '-')}; pass both"
            )


def _model_with_plan(args: argparse.Namespace) -> Any:
    """The checkpoint of ``--model`` (with ``--adapters``), running the plan the options describe."""
    from skipvlm import cli
    from skipvlm.eas import EASModel
    from skipvlm.plan import Plan, token_exit_fields
    from skipvlm.runtime import apply_plan, current_plan

    folder = cli._check_model_dir(args.model)
    model = cli._load_model(folder, args)
    if getattr(args, "adapters", None):
        model = EASModel.from_pretrained(model, args.adapters)
    plan = current_plan(model)
    if getattr(args, "plan", None):
        plan = Plan.load(args.plan)
    if getattr(args, "skip_attention_layers", None) is not None:
        plan = plan.with_skips(skip_attention=args.skip_attention_layers)
    tokens = {
        f.name: getattr(args, f.name) for f in token_exit_fields() if getattr(args, f.name, None) is not None
    }
    check_token_flags(tokens, plan)
    plan = plan.replace(**tokens)
    if isinstance(model, EASModel):
        model.set_plan(plan)
    else:
        apply_plan(model, plan)
    return model, folder


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from skipvlm.data import ChatCollator, ChatExample, load_processor
    from skipvlm.runtime import current_plan, exit_layers

    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    model, folder = _model_with_plan(args)
    collator = ChatCollator(load_processor(folder), prompt_format=args.prompt_format)
    print(f"prompt: {collator.template}", file=sys.stderr)
    device = next(model.parameters()).device
    batch = collator([ChatExample(args.prompt, "", args.image, id="prompt")], train=False)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = collator.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    exits = exit_layers(model)
    print(f"plan: {current_plan(model).to_json()}", file=sys.stderr)
    if exits is not None:
        print(f"visual tokens left at layer {exits[0]}", file=sys.stderr)
    print(answer.strip())
    return 0


def _cmd_calibrate_vtw(args: argparse.Namespace) -> int:
    from skipvlm import cli
    from skipvlm.runtime import current_plan
    from skipvlm.tokens.vtw import calibrate_vtw

    examples = cli._data(args, "data")[: args.limit]
    model, folder = _model_with_plan(args)
    collator = cli._collator(folder, args)
    out = Path(args.out)
    result = calibrate_vtw(
        model,
        examples,
        eta=args.eta,
        min_layer=args.min_layer,
        collator=collator,
        batch_size=args.batch_size,
        plot=out / "vtw_kl.png",
    )
    result.save(out / "vtw_calibration.json")
    base = current_plan(model).skips_only()
    exit_layer = result.layer if result.layer < result.num_layers else None  # L: every token stays
    base.replace(visual_exit_layer=exit_layer).save(out / "plan.json")
    print(result.table())
    print(
        f"VTW exit layer {result.layer} of {result.num_layers} (eta {result.eta:g}, {result.num_examples} "
        f"examples) -> {out / 'vtw_calibration.json'}, {out / 'vtw_kl.png'}, {out / 'plan.json'}"
    )
    return 0


def _cmd_train_dyvte(args: argparse.Namespace) -> int:
    from skipvlm import cli
    from skipvlm.tokens.dyvte import DyVTEConfig, train_dyvte

    examples = cli._data(args, "train")
    config = cli._config_from_args(DyVTEConfig, args, batch_size=args.batch_size)
    model, folder = _model_with_plan(args)
    routers = train_dyvte(model, examples, cli._collator(folder, args), config, output_dir=args.out)
    report = routers.report
    print(
        f"trained routers for layers {routers.layers} on {report['samples']} labels "
        f"({report['exit_labels']} exit), train accuracy {100 * report['train_accuracy']:.1f}% -> {args.out}"
    )
    return 0


def _add_plan_args(parser: argparse.ArgumentParser, tokens: bool = True) -> None:
    from skipvlm import cli
    from skipvlm.tokens.fastv import SOURCES as FASTV_SOURCES

    group = parser.add_argument_group("plan (default: the plan the checkpoint / adapters carry)")
    group.add_argument("--adapters", help="EAS adapters folder from `skipvlm train`")
    group.add_argument("--plan", help="a plan.json to run")
    group.add_argument("--skip-attention-layers", type=cli._parse_layers, help="attentions to skip, e.g. 3,5")
    if not tokens:
        return
    group.add_argument("--visual-exit-layer", type=int, help="VTW: withdraw visual tokens before this layer")
    group.add_argument("--fastv-layer", type=int, help="FastV: keep the top visual tokens from this layer")
    group.add_argument("--fastv-ratio", type=float, help="FastV: fraction of visual tokens dropped (0.5)")
    group.add_argument("--fastv-source", choices=FASTV_SOURCES, help="FastV: ranking queries (last)")
    group.add_argument("--dyvte", help="DyVTE: router folder from `skipvlm train-dyvte`")
    group.add_argument("--dyvte-threshold", type=float, help="DyVTE: exit probability to pass (0.5)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommands to the ``skipvlm`` parser."""
    from skipvlm import cli
    from skipvlm.tokens.dyvte import DyVTEConfig

    gen = sub.add_parser("generate", help="answer one prompt (+ image) under any plan, token exit included")
    gen.add_argument("--model", required=True, help="a locally saved Hugging Face checkpoint folder")
    gen.add_argument("--prompt", required=True, help="the user's question")
    gen.add_argument("--image", help="an image file")
    gen.add_argument(
        "--prompt-format",
        help="a custom prompt layout with {image} and {prompt} (default: the model's chat template)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    cli._add_allow_missing(gen)
    _add_plan_args(gen)
    gen.set_defaults(func=_cmd_generate)

    cal = sub.add_parser(
        "calibrate-vtw", help="choose VTW's exit layer by the KL of the next-token distribution"
    )
    cli._add_common(cal, ("data",))
    cal.add_argument("--out", required=True, help="folder for vtw_calibration.json, vtw_kl.png, plan.json")
    cli._add_overwrite(cal)
    cal.add_argument("--eta", type=float, default=0.003, help="KL threshold (default 0.003, for 7B models)")
    cal.add_argument("--min-layer", type=int, default=1, help="first candidate exit layer (default 1)")
    cal.add_argument(
        "--limit", type=cli._positive_int, default=64, help="calibration examples used (default 64)"
    )
    _add_plan_args(cal, tokens=False)
    cal.set_defaults(func=_cmd_calibrate_vtw)

    dyv = sub.add_parser("train-dyvte", help="train DyVTE's exit routers on a frozen model")
    cli._add_common(dyv, ("train",))
    dyv.add_argument("--out", required=True, help="folder for the routers")
    cli._add_overwrite(dyv)
    cli._add_config_args(dyv, DyVTEConfig, skip=("batch_size",))
    _add_plan_args(dyv, tokens=False)
    dyv.set_defaults(func=_cmd_train_dyvte)
