"""The ``skipvlm`` command line. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from skipvlm import __version__


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
    from skipvlm.toy import pretrain

    info = pretrain(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
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


# --- options generated from the config dataclasses -------------------------------------------------------


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from err
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer index, e.g. 3,5; got an empty list")
    return layers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of the dataclass ``cls``, typed and documented from the field."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kind = str(f.type)
        if kind == "bool":
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind.startswith("list"):
            group.add_argument(flag, dest=f.name, type=_parse_layers, default=None, help=help_text)
        elif kind in ("int", "float", "str"):
            group.add_argument(
                flag,
                dest=f.name,
                type={"int": int, "float": float, "str": str}[kind],
                default=None,
                help=help_text,
            )


def _config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """Build ``cls`` from the options the user gave (the rest keep their defaults)."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return cls(**{**given, **overrides})


# --- search / train / eval / merge ---------------------------------------------------------------------


def _device(args: argparse.Namespace) -> Any:
    import torch

    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _check_model_dir(path: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise FileNotFoundError(f"model folder {folder} {what}; pass a locally saved Hugging Face checkpoint")
    return folder


def _check_adapters_dir(path: str) -> None:
    """Read an adapters folder's config (no weights), so a wrong path fails before the model loads."""
    from skipvlm.eas import _read_meta

    _read_meta(Path(path))


def _model_facts(folder: Path):
    """Architecture facts from config.json alone, to validate settings before loading any weights."""
    import transformers

    from skipvlm.arch import arch_facts

    return arch_facts(transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False))


def _check_training_dtype(args: argparse.Namespace) -> None:
    if args.dtype == "float16":
        raise ValueError(
            "--dtype float16 stores the trained weights in half precision, which overflows in training; "
            "keep --dtype float32 (or bfloat16) and pass --precision fp16 for mixed-precision compute"
        )


def _data_fingerprint(*paths: str | None) -> str:
    """A digest of the data files (content), so that a resumed run refuses other data."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        p = Path(path)
        if p.is_file():
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(p.resolve()).encode())
    return digest.hexdigest()[:16]


def _load_model(folder: Path, args: argparse.Namespace):
    import torch

    from skipvlm.merge import load_pretrained

    dtype = getattr(torch, args.dtype)  # the --dtype choices are torch dtype names
    device = _device(args)
    allow = getattr(args, "allow_missing_weights", False)
    return load_pretrained(folder, allow_missing_weights=allow, dtype=dtype).to(device).eval()


class _Batches(Sequence):
    """Batches collated when they are read, so memory does not grow with the data set."""

    def __init__(self, examples: list, collator: Any, batch_size: int):
        self.examples, self.collator, self.batch_size = examples, collator, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.collator(self.examples[i * self.batch_size : (i + 1) * self.batch_size])


def _batches(examples: list, collator, batch_size: int) -> _Batches:
    return _Batches(examples, collator, batch_size)


def _data(args: argparse.Namespace, attr: str) -> list:
    """Examples from the data file of ``--<attr>`` in ``--format``; bad rows reported (and skipped)."""
    from skipvlm.data import formats

    path = getattr(args, attr)
    common = {"on_bad_row": args.on_bad_row, "max_chars": args.max_chars}
    if args.format == "jsonl":
        report = formats.load_chat_jsonl(path, image_folder=args.image_folder, **common)
    elif args.format == "llava":
        report = formats.load_llava(path, image_folder=args.image_folder, **common)
    elif args.format == "scienceqa":
        if not args.scienceqa_splits:
            raise ValueError("--format scienceqa needs --scienceqa-splits pid_splits.json")
        split = {"train": "train", "heldout": "val", "data": "test"}[attr] if not args.split else args.split
        report = formats.load_scienceqa(
            path, args.scienceqa_splits, split, args.image_folder, fmt=args.scienceqa_format, **common
        )
    else:
        report = formats.load_hf_dataset(
            path,
            split=args.split,
            image_column=args.image_column,
            question_column=args.question_column,
            answer_column=args.answer_column,
            choices_column=args.choices_column,
            **common,
        )
    print(report.summary(), file=sys.stderr)
    if not report.examples:
        raise ValueError(f"{path}: no usable examples")
    return report.examples


def _max_positions(folder: Path) -> int | None:
    """The longest sequence the checkpoint's text model has position embeddings for."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def _collator(folder: Path, args: argparse.Namespace):
    from skipvlm.data import ChatCollator, load_processor

    limit = _max_positions(folder)
    if args.max_length is not None and limit is not None and args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's {limit} positions; lower it")
    collator = ChatCollator(
        load_processor(folder), prompt_format=args.prompt_format, max_length=args.max_length or limit
    )
    print(f"prompts are built with {collator.template}", file=sys.stderr)
    return collator


def _record_prompt(out: str | None, collator: Any) -> None:
    """Write which prompt layout the run used into ``out/prompt.json`` (rank 0)."""
    from skipvlm.io import atomic_write_text

    if out is None or int(os.environ.get("RANK", "0")) != 0:
        return
    data = {
        "template": collator.template,
        "prompt_format": collator.prompt_format,
        "chat_template": collator.chat_template,
    }
    atomic_write_text(Path(out) / "prompt.json", json.dumps(data, indent=1) + "\n")


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cmd_search(args: argparse.Namespace) -> int:
    from skipvlm.eas import EASConfig
    from skipvlm.train import SearchConfig, TrainConfig, search

    folder = _check_model_dir(args.model)
    _check_training_dtype(args)
    _device(args)
    config = _config_from_args(SearchConfig, args, train=_config_from_args(TrainConfig, args))
    _config_from_args(EASConfig, args)  # bad adapter settings fail before any data or weights load
    train_ex, held_ex = _data(args, "train"), _data(args, "heldout")
    steps = math.ceil(math.ceil(len(train_ex) / args.batch_size) // _world() / config.train.grad_accum)
    config.check_against(_model_facts(folder).num_layers, max(steps, 1))
    collator = _collator(folder, args)
    _record_prompt(args.out, collator)
    train_b, held_b = (
        _batches(train_ex, collator, args.batch_size),
        _batches(held_ex, collator, args.batch_size),
    )
    model = _load_model(folder, args)
    result = search(
        model,
        train_b,
        held_b,
        config,
        eas=_config_from_args(EASConfig, args),
        out=args.out,
        resume=args.resume,
        data=_data_fingerprint(args.train, args.heldout),
    )
    names = ", ".join(f"{i}" for i in result.arms)
    print(f"searched {config.candidates} candidates: skip {names} -> {Path(args.out) / 'plan.json'}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from skipvlm.eas import EASConfig
    from skipvlm.plan import Plan
    from skipvlm.train import TrainConfig, eas_config_for_plan, train

    folder = _check_model_dir(args.model)
    _check_training_dtype(args)
    _device(args)
    eas = _config_from_args(EASConfig, args)
    if args.plan:
        given = [
            f"--{n.replace('_', '-')}"
            for n in ("skip_attention", "skip_mlp", "skip_layers")
            if getattr(args, n)
        ]
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
    eas.plan().validate_for(_model_facts(folder).num_layers)
    config = _config_from_args(TrainConfig, args)
    train_ex = _data(args, "train")
    collator = _collator(folder, args)
    _record_prompt(args.out, collator)
    model = _load_model(folder, args)
    trained = train(
        model,
        _batches(train_ex, collator, args.batch_size),
        config,
        eas=eas,
        out=args.out,
        resume=args.resume,
        data=_data_fingerprint(args.train),
    )
    trainable, total = trained.trainable_parameters()
    print(
        f"trained {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) with "
        f"{trained.plan}; adapters -> {Path(args.out) / 'adapters'}"
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from skipvlm.eas import EASModel
    from skipvlm.evaluate import evaluate
    from skipvlm.io import atomic_write_text

    folder = _check_model_dir(args.model)
    if args.merge != "none" and not args.adapters:
        raise ValueError(f"--merge {args.merge} merges --adapters; pass the adapters folder too")
    if args.merge == "per_example" and args.batch_size != 1:
        raise ValueError("--merge per_example re-merges for every example: pass --batch-size 1")
    if args.adapters:
        _check_adapters_dir(args.adapters)
    examples = _data(args, "data")
    collator = _collator(folder, args)
    model = _load_model(folder, args)
    if args.adapters:
        model = EASModel.from_pretrained(model, args.adapters)
        if args.merge != "none":
            model = model.merge_and_unload(args.merge)
    if args.format == "scienceqa":
        from skipvlm.evaluate import generate_answers
        from skipvlm.scoring import SCIENCEQA_COLUMNS, score_scienceqa

        answers = generate_answers(model, collator, examples, args.batch_size, args.max_new_tokens)
        data = score_scienceqa(examples, answers)
        acc = data["accuracy"]
        print("  ".join(f"{c:>6}" for c in SCIENCEQA_COLUMNS))
        print("  ".join(f"{acc[c]:>6.2f}" if acc[c] is not None else f"{'-':>6}" for c in SCIENCEQA_COLUMNS))
    else:
        result = evaluate(model, collator, examples, args.batch_size, args.max_new_tokens, metric=args.metric)
        data = result.to_dict()
        print(f"accuracy {100 * result.accuracy:.2f}% ({result.correct}/{result.total}) on {args.data}")
    data["prompt_template"] = collator.template
    if args.out:
        path = atomic_write_text(Path(args.out) / "eval.json", json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from skipvlm.data import load_processor
    from skipvlm.eas import EASModel

    folder = _check_model_dir(args.model)
    _check_adapters_dir(args.adapters)
    model = EASModel.from_pretrained(_load_model(folder, args), args.adapters)
    path = model.export_merged(args.out, processor=load_processor(folder))
    print(f"merged {model.plan} into a stock checkpoint -> {path}")
    return 0


# --- cost / bench ------------------------------------------------------------------------------------------


def _skip_plan(args: argparse.Namespace, num_layers: int):
    """The plan of --skip-attention N (N attentions, the benchmark's pattern) or --skip-attention-layers."""
    from skipvlm.bench import skip_layers
    from skipvlm.plan import Plan, token_exit_fields

    attention = list(args.skip_attention_layers or [])
    if args.skip_attention:
        attention = skip_layers(num_layers, args.skip_attention)
    from skipvlm.cli_tokens import check_token_flags

    tokens = {
        f.name: getattr(args, f.name)
        for f in token_exit_fields()  # those this command offers as options
        if getattr(args, f.name, None) is not None
    }
    check_token_flags(tokens)
    plan = Plan(skip_attention=attention, skip_mlp=list(args.skip_mlp_layers or []), **tokens)
    plan.validate_for(num_layers)
    return plan


def _preset_or_model(args: argparse.Namespace, device: str = "meta"):
    import torch

    from skipvlm import presets

    dtype = getattr(torch, args.dtype)  # the --dtype choices are torch dtype names
    if bool(args.preset) == bool(args.model):
        raise ValueError("pass exactly one of --preset NAME or --model DIR")
    if args.preset:
        return args.preset, presets.build(args.preset, device=device, dtype=dtype)
    folder = _check_model_dir(args.model)
    if device == "meta":
        import transformers

        return folder.name, presets.build(
            transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False),
            device="meta",
            dtype=dtype,
        )
    return folder.name, _load_model(folder, args)


def _cmd_cost(args: argparse.Namespace) -> int:
    from skipvlm.arch import arch_facts
    from skipvlm.cost import count_macs
    from skipvlm.io import atomic_write_text

    name, model = _preset_or_model(args)
    facts = arch_facts(model)
    plan = _skip_plan(args, facts.num_layers)
    base = count_macs(model, args.prompt_tokens, images=args.images)
    cost = count_macs(model, args.prompt_tokens, plan, images=args.images)
    removed = base.total - cost.total
    print(
        f"{name}: {facts.num_layers} layers, C={facts.hidden_size}, prompt {args.prompt_tokens} tokens; "
        f"{plan}"
    )
    print(f"{'module':<14}{'stock GMACs':>14}{'plan GMACs':>14}")
    for label in ("attention", "mlp", "vision", "projector", "lm_head"):
        print(f"{label:<14}{getattr(base, label) / 1e9:>14.1f}{getattr(cost, label) / 1e9:>14.1f}")
    print(f"{'total':<14}{base.total / 1e9:>14.1f}{cost.total / 1e9:>14.1f}")
    print(f"the plan removes {removed / 1e9:.1f} GMACs = {100 * removed / base.total:.1f}% of the total")
    if args.out:
        data = {
            "model": name,
            "stock": base.to_dict(),
            "plan": cost.to_dict(),
            "removed_share": removed / base.total,
        }
        path = atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import platform

    import torch
    import transformers

    from skipvlm.arch import arch_facts
    from skipvlm.bench import bench_table, run_bench
    from skipvlm.io import atomic_write_text

    device = _device(args)
    name, model = _preset_or_model(args, device=str(device))
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = arch_facts(model)
    if facts.model_type not in ("llama", "mistral", "qwen2", "llava"):
        raise ValueError(
            f"skipvlm bench builds prompts for Llama / Mistral / Qwen2 / LLaVA, not {facts.model_type}"
        )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(facts.vocab_size, 30000), (1, args.prompt_tokens), generator=gen)
    inputs = {"input_ids": ids}
    if facts.model_type == "llava":  # one image: its tokens after the first text token, random pixels
        vision = model.config.vision_config
        image_tokens = (vision.image_size // vision.patch_size) ** 2
        if image_tokens + 2 > args.prompt_tokens:
            raise ValueError(f"--prompt-tokens must exceed the {image_tokens} image tokens of one image")
        ids[0, 1 : 1 + image_tokens] = facts.image_token_id
        size = vision.image_size
        inputs["pixel_values"] = torch.randn(1, 3, size, size, generator=gen).to(
            next(model.parameters()).dtype
        )
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    methods = [m for m in args.methods.split(",") if m]
    rows = run_bench(model, inputs, args.skip, methods, args.new_tokens, args.repeats, progress=True)
    print(
        f"{name} on {device} ({args.dtype}), prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats} interleaved rounds"
    )
    print(bench_table(rows))
    print(
        "x: speedup against stock; bound: what the removed MACs (prefill) or bytes read per token "
        "(decode) allow; of: measured / bound"
    )
    out = Path(args.out or Path("benchmarks/results") / f"bench_{name}_{device.type}.json")
    meta = {
        "model": name,
        "device": str(device),
        "dtype": args.dtype,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: str(v) for k, v in vars(args).items() if k != "func"},
    }
    atomic_write_text(out, json.dumps({"rows": rows, "meta": meta}, indent=1) + "\n")
    from skipvlm.plots import plot_speedups

    plot_speedups(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _add_common(parser: argparse.ArgumentParser, data: tuple[str, ...]) -> None:
    parser.add_argument("--model", required=True, help="a locally saved Hugging Face checkpoint folder")
    for name in data:
        parser.add_argument(
            f"--{name}", required=True, help=f"{name} examples, JSON lines (prompt, answer, image)"
        )
    parser.add_argument("--image-folder", help="folder that relative image paths resolve against")
    parser.add_argument(
        "--format",
        choices=["jsonl", "llava", "scienceqa", "hf"],
        default="jsonl",
        help="data format (default jsonl)",
    )
    parser.add_argument(
        "--on-bad-row", choices=["skip", "fail"], default="skip", help="skip (and list) or stop"
    )
    parser.add_argument("--max-chars", type=int, default=None, help="rows longer than this are bad")
    parser.add_argument("--split", help="dataset split (scienceqa / hf)")
    parser.add_argument(
        "--scienceqa-splits", help="ScienceQA pid_splits.json (the data file is problems.json)"
    )
    parser.add_argument("--scienceqa-format", choices=["QCM-A", "QCM-ALE"], default="QCM-A")
    parser.add_argument("--image-column", default="image", help="hf: image column")
    parser.add_argument("--question-column", default="question", help="hf: question column")
    parser.add_argument("--answer-column", default="answer", help="hf: answer column")
    parser.add_argument("--choices-column", default=None, help="hf: options column (multiple choice)")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="longest example in tokens")
    parser.add_argument(
        "--prompt-format",
        help="a custom prompt layout with {image} and {prompt}, e.g. 'USER: {image}{prompt} ASSISTANT:' "
        "(default: the model's own chat template)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_allow_missing(parser)


def _add_allow_missing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-missing-weights",
        action="store_true",
        help="load a checkpoint that lacks some tensors, initialising them at random (default: an error)",
    )


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that skipvlm did not create (only this command's own files are "
        "replaced; nothing else there is deleted)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skipvlm",
        description="Skip redundant attention in multimodal LLMs and measure what it buys.",
    )
    parser.add_argument("--version", action="version", version=f"skipvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compare adaptation methods end to end on the bundled toy world")
    demo.add_argument("--quick", action="store_true", help="a smoke run in a few minutes (not a result)")
    demo.add_argument(
        "--out", default="runs/demo", help="folder for results.json and plots (default runs/demo)"
    )
    demo.add_argument("--model", help="toy checkpoint folder (default: the one shipped with skipvlm)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    show = sub.add_parser(
        "showcase", help="time the skip runtime on a LLaVA-shaped model with random weights"
    )
    show.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per timing (default 16)")
    show.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (default 5)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", help="folder to write showcase.json into")
    _add_overwrite(show)
    show.set_defaults(func=_cmd_showcase)

    toy = sub.add_parser("toy", help="the bundled toy model")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    pre = toy_sub.add_parser("pretrain", help="build and pretrain the toy LLaVA from scratch on CPU")
    pre.add_argument("--out", required=True, help="folder for the checkpoint")
    _add_overwrite(pre)
    pre.add_argument("--steps", type=int, default=6000)
    pre.add_argument("--batch-size", type=int, default=32)
    pre.add_argument("--lr", type=float, default=2e-3)
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=_cmd_toy_pretrain)
    dat = toy_sub.add_parser("data", help="write the toy's task as JSON lines + images (to try the CLI)")
    dat.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl, images/")
    dat.add_argument("--train", type=_positive_int, default=256, help="training examples (default 256)")
    dat.add_argument("--val", type=_positive_int, default=64, help="held-out examples (default 64)")
    dat.add_argument("--test", type=_positive_int, default=100, help="test examples (default 100)")
    dat.add_argument("--seed", type=int, default=0)
    _add_overwrite(dat)
    dat.set_defaults(func=_cmd_toy_data)
    pth = toy_sub.add_parser("path", help="print the folder of the bundled toy checkpoint")
    pth.set_defaults(func=_cmd_toy_path)

    from skipvlm.eas import EASConfig
    from skipvlm.plan import CANDIDATE_KINDS
    from skipvlm.train import SearchConfig, TrainConfig

    srch = sub.add_parser("search", help="search which modules are redundant for a task (bandit)")
    _add_common(srch, ("train", "heldout"))
    srch.add_argument("--out", required=True, help="folder for plan.json, search_log.json, preferences.png")
    _add_overwrite(srch)
    srch.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_config_args(srch, SearchConfig, skip=("train",))
    _add_config_args(srch, TrainConfig, skip=("epochs", "calibrate"))
    _add_config_args(
        srch, EASConfig, skip=("skip_attention", "skip_mlp", "skip_layers", "supernet", "candidates")
    )
    srch.set_defaults(func=_cmd_search)

    trn = sub.add_parser("train", help="fine-tune adapters for a plan")
    _add_common(trn, ("train",))
    trn.add_argument("--out", required=True, help="folder for adapters/ and train_log.json")
    _add_overwrite(trn)
    trn.add_argument("--plan", help="plan.json from `skipvlm search` (else use --skip-attention ...)")
    trn.add_argument(
        "--candidates",
        choices=CANDIDATE_KINDS,
        help="the candidate kind of an older --plan file that does not record it (plans from skipvlm "
        "search record it)",
    )
    trn.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    _add_config_args(trn, TrainConfig)
    _add_config_args(trn, EASConfig, skip=("supernet", "candidates"))
    trn.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="accuracy of greedy answers (exact match / multiple choice)")
    _add_common(ev, ("data",))
    ev.add_argument("--adapters", help="adapters folder from `skipvlm train` (default: the model as saved)")
    ev.add_argument("--merge", choices=["none", "static", "per_example"], default="none")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--metric", choices=["exact", "vqa"], default="exact", help="short-answer matching")
    ev.add_argument("--out", help="folder to write eval.json (accuracy and every prediction) into")
    _add_overwrite(ev)
    ev.set_defaults(func=_cmd_eval)

    mrg = sub.add_parser("merge", help="fold trained adapters into a stock checkpoint (static merge)")
    mrg.add_argument("--model", required=True, help="the base checkpoint folder")
    mrg.add_argument("--adapters", required=True, help="adapters folder from `skipvlm train`")
    mrg.add_argument("--out", required=True, help="folder for the merged checkpoint")
    _add_overwrite(mrg)
    mrg.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    mrg.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    _add_allow_missing(mrg)
    mrg.set_defaults(func=_cmd_merge)

    from skipvlm import cli_tokens

    cli_tokens.register(sub)

    for cmd_name, func, help_text in (
        ("cost", _cmd_cost, "analytic MACs per module for a plan (presets need no weights)"),
        ("bench", _cmd_bench, "latency / KV cache of stock, LoRA, PIA and merged EAS, with roofline bounds"),
    ):
        cmd = sub.add_parser(cmd_name, help=help_text)
        cmd.add_argument("--preset", help="a preset architecture (skipvlm.presets.names())")
        cmd.add_argument("--model", help="or a local checkpoint folder")
        cmd.add_argument("--prompt-tokens", type=int, default=512)
        cmd.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
        cmd.add_argument("--out", help="JSON file to write")
        cmd.set_defaults(func=func)
        if cmd_name == "cost":
            cmd.add_argument("--skip-attention", type=int, default=0, help="skip this many attentions")
            cmd.add_argument(
                "--skip-attention-layers", type=_parse_layers, help="or these layers, e.g. 3,5,7"
            )
            cmd.add_argument("--skip-mlp-layers", type=_parse_layers, help="MLPs to skip, e.g. 4,6")
            cmd.add_argument(
                "--images", type=int, default=None, help="images in the prompt (default 1 for VLMs)"
            )
            cmd.add_argument(
                "--visual-exit-layer", type=int, help="VTW: visual tokens leave before this layer"
            )
            cmd.add_argument("--fastv-layer", type=int, help="FastV: keep the top visual tokens from here")
            cmd.add_argument("--fastv-ratio", type=float, help="FastV: fraction of visual tokens dropped")
        else:
            cmd.add_argument(
                "--skip", type=_parse_layers, default=[0, 4, 6], help="k values for EAS (default 0,4,6)"
            )
            cmd.add_argument("--methods", default="stock,lora,pia,eas", help="stock, lora, pia, eas, skip")
            cmd.add_argument("--new-tokens", type=int, default=32)
            cmd.add_argument("--repeats", type=int, default=7)
            cmd.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
            cmd.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    return parser


# What each command writes into --out: (kind of output, entries it writes, --out names a file).
_OUTPUTS: dict[str, tuple[str, dict[str, str], bool]] = {
    "search": (
        "run",
        {
            "plan.json": "file",
            "search_log.json": "file",
            "preferences.png": "file",
            "search_checkpoint": "dir",
        },
        False,
    ),
    "train": (
        "run",
        {"adapters": "dir", "train_log.json": "file", "train_checkpoint": "dir", "prompt.json": "file"},
        False,
    ),
    "eval": ("run", {"eval.json": "file"}, False),
    "merge": ("checkpoint", {"config.json": "file", "model.safetensors": "file"}, False),
    "calibrate-vtw": (
        "run",
        {"vtw_calibration.json": "file", "vtw_kl.png": "file", "plan.json": "file"},
        False,
    ),
    "train-dyvte": ("routers", {"dyvte_routers.safetensors": "file", "dyvte_config.json": "file"}, False),
    "toy pretrain": ("checkpoint", {"config.json": "file", "pretrain.json": "file"}, False),
    "toy data": (
        "run",
        {"train.jsonl": "file", "val.jsonl": "file", "test.jsonl": "file", "images": "dir"},
        False,
    ),
    "showcase": ("run", {"showcase.json": "file"}, False),
    "cost": ("run", {}, True),
    "bench": ("run", {}, True),
}


def _run(args: argparse.Namespace) -> int:
    from skipvlm.outputs import claim_output

    command = args.command if args.command != "toy" else f"toy {args.toy_command}"
    spec = _OUTPUTS.get(command)
    out = getattr(args, "out", None)
    if spec is None or not out:
        return args.func(args)
    kind, entries, is_file = spec
    inputs = {
        flag: getattr(args, name, None)
        for flag, name in (("--model", "model"), ("--adapters", "adapters"), ("--dyvte", "dyvte"))
    }
    with claim_output(
        out,
        command,
        kind,
        overwrite=getattr(args, "overwrite", False),
        inputs=inputs,
        entries=entries,
        is_file=is_file,
    ):
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """Run one ``skipvlm`` command; errors end in one line ``skipvlm <cmd>: error: ...`` and exit 2
    (130 for Ctrl-C). ``SKIPVLM_DEBUG=1`` shows the traceback instead."""
    from skipvlm.train import Interrupted

    args = build_parser().parse_args(argv)
    name = args.command if args.command != "toy" else f"toy {args.toy_command}"
    try:
        return _run(args)
    except Interrupted as e:
        print(f"skipvlm {name}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"skipvlm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("SKIPVLM_DEBUG"):
            raise
        print(f"skipvlm {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The error's message on one line; errors from deep inside a library also name their type and say
    how to see the traceback."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ValueError | OSError):
        return text
    return f"{type(error).__name__}: {text} (set SKIPVLM_DEBUG=1 to see where)"


if __name__ == "__main__":
    sys.exit(main())
