"""``skipvlm search``, ``train``, ``eval`` and ``merge``: find what to skip, train its adapters, score
the result and fold the adapters into a stock checkpoint (``shared/METHODS.md`` §1-§3)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from skipvlm.cli import loading
from skipvlm.cli.options import (
    SKIP_FIELDS,
    add_allow_missing,
    add_command,
    add_config_args,
    add_device_option,
    add_dtype_option,
    add_model_option,
    add_out_option,
    add_recipe_option,
    add_run_options,
    add_skip_options,
    check_skip_layers,
    config_from_args,
    flag,
    recipe_from_args,
)
from skipvlm.runinfo import run_info


def _check_training_dtype(args: argparse.Namespace) -> None:
    if args.dtype == "float16":
        raise ValueError(
            "--dtype float16 stores the trained weights in half precision, which overflows in training; "
            "keep --dtype float32 (or bfloat16) and pass --precision fp16 for mixed-precision compute"
        )


def _cmd_search(args: argparse.Namespace) -> int:
    from skipvlm.eas import EASConfig
    from skipvlm.train import SearchConfig, TrainConfig, search

    folder = loading.check_model_dir(args.model)
    _check_training_dtype(args)
    loading.device(args)
    recipe = recipe_from_args(args)
    search_base, train_base = (recipe.search, recipe.search.train) if recipe else (None, None)
    config = config_from_args(
        SearchConfig, args, base=search_base, train=config_from_args(TrainConfig, args, base=train_base)
    )
    # bad adapter settings fail before any data or weights load (as the supernet they build)
    eas = config_from_args(EASConfig, args, base=recipe.eas if recipe else None)
    dataclasses.replace(eas, supernet=True, candidates=config.candidates)
    train_ex, held_ex = loading.data(args, "train"), loading.data(args, "heldout")
    micro_batches = math.ceil(len(train_ex) / args.batch_size) // loading.world()  # per process and epoch
    config.check_against(loading.model_facts(folder).num_layers, max(micro_batches, 1))
    collator = loading.collator(folder, args)
    loading.record_prompt(args.out, collator)
    train_b = loading.Batches(train_ex, collator, args.batch_size)
    held_b = loading.Batches(held_ex, collator, args.batch_size)
    model = loading.load_model(folder, args)
    fingerprint = loading.data_fingerprint(args.train, args.heldout)
    result = search(
        model, train_b, held_b, config, eas=eas, out=args.out, resume=args.resume, data=fingerprint
    )
    names = ", ".join(f"{i}" for i in result.arms)
    print(f"searched {config.candidates} candidates: skip {names} -> {Path(args.out) / 'plan.json'}")
    return 0


def _train_eas_config(args: argparse.Namespace, folder: Path) -> Any:
    """The adapters to train: those of ``--plan``, or of the layer lists given as options."""
    from skipvlm.eas import EASConfig
    from skipvlm.plan import Plan
    from skipvlm.train import eas_config_for_plan

    recipe = recipe_from_args(args)
    eas = config_from_args(EASConfig, args, base=recipe.eas if recipe else None)
    if args.plan:
        given = [flag(n) for n in SKIP_FIELDS if getattr(args, n)]
        if given:
            raise ValueError(
                f"--plan and {', '.join(given)} both say what to skip; pass one of them (the plan file, or "
                "the layer lists)"
            )
        plan = Plan.load(args.plan)
        if args.candidates and plan.candidates and args.candidates != plan.candidates:
            raise ValueError(
                f"--candidates {args.candidates} contradicts {args.plan}, which was searched over "
                f"{plan.candidates!r} candidates; drop --candidates"
            )
        eas = eas_config_for_plan(plan, args.candidates or plan.candidates or "attention", eas)
    elif args.candidates:
        raise ValueError("--candidates describes a --plan file; without --plan, list the skips directly")
    if eas.mlp_replace == "pia" and not eas.skip_mlp:
        raise ValueError(
            "--mlp-replace pia replaces skipped MLPs, but this plan skips none; add --skip-mlp (or use a "
            "--plan that skips MLPs), or drop --mlp-replace"
        )
    num_layers = loading.model_facts(folder).num_layers
    check_skip_layers(args, num_layers)
    eas.plan().validate_for(num_layers)
    return eas


def _cmd_train(args: argparse.Namespace) -> int:
    from skipvlm.train import TrainConfig, train

    folder = loading.check_model_dir(args.model)
    _check_training_dtype(args)
    loading.device(args)
    eas = _train_eas_config(args, folder)
    recipe = recipe_from_args(args)
    config = config_from_args(TrainConfig, args, base=recipe.train if recipe else None)
    train_ex = loading.data(args, "train")
    collator = loading.collator(folder, args)
    loading.record_prompt(args.out, collator)
    model = loading.load_model(folder, args)
    batches = loading.Batches(train_ex, collator, args.batch_size)
    fingerprint = loading.data_fingerprint(args.train)
    trained = train(model, batches, config, eas=eas, out=args.out, resume=args.resume, data=fingerprint)
    trainable, total = trained.trainable_parameters()
    print(
        f"trained {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) with "
        f"{trained.plan}; adapters -> {Path(args.out) / 'adapters'}"
    )
    return 0


def _score(args: argparse.Namespace, model: Any, collator: Any, examples: list) -> dict:
    """Greedy answers scored by ScienceQA column (``--format scienceqa``) or by ``--metric``; printed."""
    from skipvlm.evaluate import evaluate, generate_answers
    from skipvlm.scoring import SCIENCEQA_COLUMNS, score_scienceqa

    if args.format == "scienceqa":
        answers = generate_answers(model, collator, examples, args.batch_size, args.max_new_tokens)
        scored = score_scienceqa(examples, answers)
        acc = scored["accuracy"]
        print("  ".join(f"{c:>6}" for c in SCIENCEQA_COLUMNS))
        print("  ".join(f"{acc[c]:>6.2f}" if acc[c] is not None else f"{'-':>6}" for c in SCIENCEQA_COLUMNS))
        return scored
    result = evaluate(model, collator, examples, args.batch_size, args.max_new_tokens, metric=args.metric)
    print(f"accuracy {100 * result.accuracy:.2f}% ({result.correct}/{result.total}) on {args.data}")
    return result.to_dict()


def _cmd_eval(args: argparse.Namespace) -> int:
    from skipvlm.eas import EASModel
    from skipvlm.io import atomic_write_text

    folder = loading.check_model_dir(args.model)
    if args.merge != "none" and not args.adapters:
        raise ValueError(f"--merge {args.merge} merges --adapters; pass the adapters folder too")
    if args.merge == "per_example" and args.batch_size != 1:
        raise ValueError("--merge per_example re-merges for every example: pass --batch-size 1")
    if args.adapters:
        loading.check_adapters_dir(args.adapters)
    examples = loading.data(args, "data")
    collator = loading.collator(folder, args)
    model = loading.load_model(folder, args)
    if args.adapters:
        model = EASModel.from_pretrained(model, args.adapters)
        if args.merge != "none":
            model = model.merge_and_unload(args.merge)
    scored = _score(args, model, collator, examples)
    scored["prompt_template"] = collator.template
    reference = next(model.parameters())
    scored["meta"] = run_info(reference.device, reference.dtype)
    if args.out:
        path = atomic_write_text(Path(args.out) / "eval.json", json.dumps(scored, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from skipvlm.data import load_processor
    from skipvlm.eas import EASModel

    folder = loading.check_model_dir(args.model)
    loading.check_adapters_dir(args.adapters)
    model = EASModel.from_pretrained(loading.load_model(folder, args), args.adapters)
    path = model.export_merged(args.out, processor=load_processor(folder))
    print(f"merged {model.plan} into a stock checkpoint -> {path}")
    return 0


def _add_resume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``search``, ``train``, ``eval`` and ``merge`` to the ``skipvlm`` parser."""
    from skipvlm.eas import EASConfig
    from skipvlm.plan import CANDIDATE_KINDS
    from skipvlm.train import SearchConfig, TrainConfig

    srch = add_command(sub, "search", "search which modules are redundant for a task (bandit)")
    add_run_options(srch, ("train", "heldout"))
    add_out_option(srch, "folder for plan.json, search_log.json, preferences.png", required=True)
    _add_resume(srch)
    add_recipe_option(srch)
    add_config_args(srch, SearchConfig, skip=("train",))
    add_config_args(srch, TrainConfig, skip=("epochs", "calibrate"))
    add_config_args(srch, EASConfig, skip=(*SKIP_FIELDS, "supernet", "candidates"))
    srch.set_defaults(func=_cmd_search)

    trn = add_command(sub, "train", "fine-tune adapters for a plan")
    add_run_options(trn, ("train",))
    add_out_option(trn, "folder for adapters/ and train_log.json", required=True)
    trn.add_argument("--plan", help="plan.json from `skipvlm search` (else use --skip-attention ...)")
    trn.add_argument(
        "--candidates",
        choices=CANDIDATE_KINDS,
        help="the candidate kind of an older --plan file that does not record it (plans from skipvlm "
        "search record it)",
    )
    _add_resume(trn)
    add_recipe_option(trn)
    add_config_args(trn, TrainConfig)
    add_skip_options(trn.add_argument_group("what to skip, without --plan"))
    add_config_args(trn, EASConfig, skip=(*SKIP_FIELDS, "supernet", "candidates"))
    trn.set_defaults(func=_cmd_train)

    ev = add_command(sub, "eval", "accuracy of greedy answers (exact match / multiple choice)")
    add_run_options(ev, ("data",))
    ev.add_argument("--adapters", help="adapters folder from `skipvlm train` (default: the model as saved)")
    ev.add_argument("--merge", choices=["none", "static", "per_example"], default="none")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--metric", choices=["exact", "vqa"], default="exact", help="short-answer matching")
    add_out_option(ev, "folder to write eval.json (accuracy and every prediction) into")
    ev.set_defaults(func=_cmd_eval)

    mrg = add_command(sub, "merge", "fold trained adapters into a stock checkpoint (static merge)")
    add_model_option(mrg, help="the base checkpoint folder")
    mrg.add_argument("--adapters", required=True, help="adapters folder from `skipvlm train`")
    add_out_option(mrg, "folder for the merged checkpoint", required=True)
    add_device_option(mrg)
    add_dtype_option(mrg)
    add_allow_missing(mrg)
    mrg.set_defaults(func=_cmd_merge)
