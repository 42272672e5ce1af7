"""``skipvlm generate``, ``calibrate-vtw`` and ``train-dyvte``: the inference-side commands.

They share the plan options: any skip plan, with or without adapters, plus one visual-token exit method
(``shared/METHODS.md`` §4).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from skipvlm.cli import loading
from skipvlm.cli.options import (
    add_allow_missing,
    add_command,
    add_config_args,
    add_device_option,
    add_dtype_option,
    add_model_option,
    add_out_option,
    add_prompt_format_option,
    add_run_options,
    add_skip_options,
    add_token_exit_options,
    check_skip_layers,
    config_from_args,
    plan_from_args,
    positive_int,
)


def _model_with_plan(args: argparse.Namespace) -> tuple[Any, Path]:
    """The checkpoint of ``--model`` (with ``--adapters``), running the plan the options describe."""
    from skipvlm.eas import EASModel
    from skipvlm.plan import Plan
    from skipvlm.runtime import apply_plan, current_plan

    folder = loading.check_model_dir(args.model)
    check_skip_layers(args, loading.model_facts(folder).num_layers)
    model = loading.load_model(folder, args)
    if args.adapters:
        model = EASModel.from_pretrained(model, args.adapters)
    plan = Plan.load(args.plan) if args.plan else current_plan(model)
    if args.skip_attention is not None:
        plan = plan.with_skips(skip_attention=args.skip_attention)
    plan = plan_from_args(args, plan)
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
    from skipvlm.runtime import current_plan
    from skipvlm.tokens.vtw import calibrate_vtw

    examples = loading.data(args, "data")[: args.limit]
    model, folder = _model_with_plan(args)
    collator = loading.collator(folder, args)
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
    from skipvlm.tokens.dyvte import DyVTEConfig, train_dyvte

    examples = loading.data(args, "train")
    config = config_from_args(DyVTEConfig, args, batch_size=args.batch_size)
    model, folder = _model_with_plan(args)
    routers = train_dyvte(model, examples, loading.collator(folder, args), config, output_dir=args.out)
    report = routers.report
    print(
        f"trained routers for layers {routers.layers} on {report['samples']} labels "
        f"({report['exit_labels']} exit), train accuracy {100 * report['train_accuracy']:.1f}% -> {args.out}"
    )
    return 0


def _add_plan_args(parser: argparse.ArgumentParser, tokens: bool = True) -> None:
    """The plan to run: the checkpoint's own, or ``--adapters`` / ``--plan``, with skips and (with
    ``tokens``) a token exit given as options on top."""
    group = parser.add_argument_group("plan (default: the plan the checkpoint / adapters carry)")
    group.add_argument("--adapters", help="EAS adapters folder from `skipvlm train`")
    group.add_argument("--plan", help="a plan.json to run")
    add_skip_options(group, ("skip_attention",))
    if tokens:
        add_token_exit_options(group)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``, ``calibrate-vtw`` and ``train-dyvte`` to the ``skipvlm`` parser."""
    from skipvlm.tokens.dyvte import DyVTEConfig

    gen = add_command(sub, "generate", "answer one prompt (+ image) under any plan, token exit included")
    add_model_option(gen)
    gen.add_argument("--prompt", required=True, help="the user's question")
    gen.add_argument("--image", help="an image file")
    add_prompt_format_option(gen)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    add_device_option(gen)
    add_dtype_option(gen)
    add_allow_missing(gen)
    _add_plan_args(gen)
    gen.set_defaults(func=_cmd_generate)

    cal = add_command(
        sub, "calibrate-vtw", "choose VTW's exit layer by the KL of the next-token distribution"
    )
    add_run_options(cal, ("data",))
    add_out_option(cal, "folder for vtw_calibration.json, vtw_kl.png, plan.json", required=True)
    cal.add_argument("--eta", type=float, default=0.003, help="KL threshold (default 0.003, for 7B models)")
    cal.add_argument("--min-layer", type=int, default=1, help="first candidate exit layer (default 1)")
    cal.add_argument("--limit", type=positive_int, default=64, help="calibration examples used (default 64)")
    _add_plan_args(cal, tokens=False)
    cal.set_defaults(func=_cmd_calibrate_vtw)

    dyv = add_command(sub, "train-dyvte", "train DyVTE's exit routers on a frozen model")
    add_run_options(dyv, ("train",))
    add_out_option(dyv, "folder for the routers", required=True)
    add_config_args(dyv, DyVTEConfig, skip=("batch_size",))
    _add_plan_args(dyv, tokens=False)
    dyv.set_defaults(func=_cmd_train_dyvte)
