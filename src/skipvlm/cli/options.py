"""The options the ``skipvlm`` commands share, each defined once, and the readers that turn parsed
options back into library objects: a config dataclass from its fields, a :class:`~skipvlm.plan.Plan`
from the token-exit options."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from skipvlm.plan import Plan, token_exit_fields, token_exit_methods

DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names
DATA_FORMATS = ("jsonl", "llava", "scienceqa", "hf")


def flag(name: str) -> str:
    """The option of a field: ``skip_attention`` -> ``--skip-attention``."""
    return "--" + name.replace("_", "-")


def add_command(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand. Abbreviated options are refused: a prefix of one option must not silently mean
    another (``--skip-attention`` is not ``--skip-attention-counts``)."""
    return sub.add_parser(name, help=help, description=help, allow_abbrev=False)


def refuse_option(parser: argparse.ArgumentParser, option: str, fix: str) -> None:
    """A hidden ``option`` that stops the parse with ``fix``: for options that mean something else here."""

    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is not an option of this command; {fix}")

    parser.add_argument(option, nargs="?", action=Refuse, help=argparse.SUPPRESS)


# --- values -------------------------------------------------------------------------------------------------


def _int_list(text: str, what: str, example: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}, e.g. {example}; got an empty list")
    return values


def parse_layers(text: str) -> list[int]:
    """Comma-separated layer indices, e.g. ``3,5,7``."""
    return _int_list(text, "layer index", "3,5")


def parse_counts(text: str) -> list[int]:
    """Comma-separated counts, e.g. ``0,4,6``."""
    counts = _int_list(text, "count", "0,4,6")
    if min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected counts of 0 or more, got {text!r}")
    return counts


def count(text: str) -> int:
    """A count of 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (0 or more), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count (0 or more), got {value}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# --- model, device, outputs ---------------------------------------------------------------------------------


def add_model_option(
    parser: argparse.ArgumentParser,
    required: bool = True,
    help: str = "a locally saved Hugging Face checkpoint folder",
) -> None:
    parser.add_argument("--model", required=required, help=help)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")


def add_allow_missing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-missing-weights",
        action="store_true",
        help="load a checkpoint that lacks some tensors, initialising them at random (default: an error)",
    )


def add_out_option(
    parser: argparse.ArgumentParser,
    help: str,
    required: bool = False,
    default: str | None = None,
    overwrite: bool = True,
) -> None:
    """``--out`` and, for commands that write into a folder, ``--overwrite``."""
    parser.add_argument("--out", required=required, default=default, help=help)
    if overwrite:
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="write into a non-empty --out that skipvlm did not create (only this command's own files "
            "are replaced; nothing else there is deleted)",
        )


# --- data ---------------------------------------------------------------------------------------------------


def add_prompt_format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompt-format",
        help="a custom prompt layout with {image} and {prompt}, e.g. 'USER: {image}{prompt} ASSISTANT:' "
        "(default: the model's own chat template)",
    )


def add_data_options(parser: argparse.ArgumentParser, files: tuple[str, ...]) -> None:
    """One required option per data file in ``files`` (``train``, ``heldout``, ``data``), and how to read
    and batch them."""
    for name in files:
        parser.add_argument(f"--{name}", required=True, help=f"{name} examples (see --format)")
    group = parser.add_argument_group("data")
    group.add_argument("--image-folder", help="folder that relative image paths resolve against")
    group.add_argument("--format", choices=DATA_FORMATS, default="jsonl", help="data format (default jsonl)")
    group.add_argument(
        "--on-bad-row", choices=["skip", "fail"], default="skip", help="skip (and list) or stop"
    )
    group.add_argument("--max-chars", type=int, default=None, help="rows longer than this are bad")
    group.add_argument("--split", help="dataset split (scienceqa / hf)")
    group.add_argument(
        "--scienceqa-splits", help="ScienceQA pid_splits.json (the data file is problems.json)"
    )
    group.add_argument("--scienceqa-format", choices=["QCM-A", "QCM-ALE"], default="QCM-A")
    group.add_argument("--image-column", default="image", help="hf: image column")
    group.add_argument("--question-column", default="question", help="hf: question column")
    group.add_argument("--answer-column", default="answer", help="hf: answer column")
    group.add_argument("--choices-column", default=None, help="hf: options column (multiple choice)")
    group.add_argument("--batch-size", type=positive_int, default=8)
    group.add_argument("--max-length", type=int, default=None, help="longest example in tokens")
    add_prompt_format_option(group)


def add_run_options(parser: argparse.ArgumentParser, files: tuple[str, ...]) -> None:
    """What every command that runs a checkpoint on data files takes: the model, the data, the device."""
    add_model_option(parser)
    add_data_options(parser, files)
    add_device_option(parser)
    add_dtype_option(parser)
    add_allow_missing(parser)


# --- module skips -------------------------------------------------------------------------------------------

# The module-skip options: each lists layer indices, on every command that offers it. A number of skipped
# attentions has its own option (--skip-attention-count on cost, --skip-attention-counts on bench).
_SKIP_OPTIONS = {
    "skip_attention": "attention layers to skip, as layer indices, e.g. 3,5",
    "skip_mlp": "MLP layers to skip, as layer indices, e.g. 4,6",
    "skip_layers": "whole decoder layers to skip, each replaced by a DAS bottleneck adapter, e.g. 2,6",
}
SKIP_FIELDS = tuple(_SKIP_OPTIONS)
SKIP_COUNT = "--skip-attention-count"


def add_skip_options(parser: Any, fields: tuple[str, ...] = SKIP_FIELDS) -> None:
    """``--skip-attention`` / ``--skip-mlp`` / ``--skip-layers`` (those in ``fields``): layer lists."""
    for name in fields:
        parser.add_argument(flag(name), dest=name, type=parse_layers, default=None, help=_SKIP_OPTIONS[name])


def check_skip_layers(args: argparse.Namespace, num_layers: int) -> None:
    """Refuse layer indices the model does not have, naming the option and what it expects (a number
    where layers are listed is the likely mistake)."""
    for name in SKIP_FIELDS:
        layers = getattr(args, name, None) or []
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            given = ",".join(map(str, layers))
            counts = name == "skip_attention" and hasattr(args, "skip_attention_count")
            hint = f"; to skip a number of attentions, pass {SKIP_COUNT} N instead" if counts else ""
            raise ValueError(
                f"{flag(name)} {given}: the model has {num_layers} decoder layers, so there is no layer "
                f"{', '.join(map(str, bad))}; {flag(name)} lists layer indices 0..{num_layers - 1}, e.g. "
                f"1,3{hint}"
            )


def check_skip_count(option: str, value: int, num_layers: int) -> None:
    """Refuse a number of skipped attentions larger than the model's layer count."""
    if value > num_layers:
        raise ValueError(
            f"{option} {value}: the model has only {num_layers} attentions; pass at most {num_layers}"
        )


# --- token exit ---------------------------------------------------------------------------------------------


def add_token_exit_options(parser: Any, per_example: bool = True) -> None:
    """One option per plan field of every registered token-exit method (see
    :func:`skipvlm.plan.register_token_exit`), named like the field; without ``per_example``, only the
    methods whose exit layer the plan fixes (what ``cost`` can count without data)."""
    for method in token_exit_methods():
        if method.per_example and not per_example:
            continue
        for f in method.fields:
            parser.add_argument(flag(f.name), dest=f.name, type=f.type, choices=f.choices, help=f.help)


def check_token_flags(tokens: dict[str, Any], plan: Plan | None = None) -> None:
    """Refuse token-exit options that would be ignored: a method's setting (e.g. FastV's ratio) without
    its switch (FastV's layer), in the options or in ``plan``."""
    for method in token_exit_methods():
        needs = method.switch
        for f in method.fields[1:]:
            if f.name in tokens and tokens.get(needs) is None and getattr(plan, needs, None) is None:
                raise ValueError(f"{flag(f.name)} has no effect without {flag(needs)}; pass both")


def plan_from_args(args: argparse.Namespace, base: Plan) -> Plan:
    """``base`` with the token-exit options the user gave; the rest of ``base`` is kept."""
    tokens = {f.name: getattr(args, f.name, None) for f in token_exit_fields()}
    tokens = {name: value for name, value in tokens.items() if value is not None}
    check_token_flags(tokens, base)
    return base.replace(**tokens)


# --- config dataclasses -------------------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of the dataclass ``cls``, typed and documented from the field."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        kw["help"] = f"{f.metadata.get('help', '')} (default: {default})"
        kind = str(f.type)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("list"):
            kw["type"] = parse_layers
        elif kind in ("int", "float", "str"):
            kw["type"] = {"int": int, "float": float, "str": str}[kind]
        else:
            continue
        group.add_argument(flag(f.name), **kw)


def config_from_args(cls: type, args: argparse.Namespace, base: Any = None, **overrides: Any) -> Any:
    """Build ``cls`` from the options the user gave; the rest come from ``base`` (e.g. a recipe's config)
    if given, else keep their defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    if base is not None:
        return dataclasses.replace(base, **{**given, **overrides})
    return cls(**{**given, **overrides})


def add_recipe_option(parser: argparse.ArgumentParser) -> None:
    """``--recipe NAME``: start from a recipe's settings (:mod:`skipvlm.recipes`); options given win."""
    from skipvlm.recipes import recipe_names

    parser.add_argument(
        "--recipe",
        choices=recipe_names(),
        help="start from the EAS paper's settings for a setup (see the README's recipe table); options "
        "given explicitly override it",
    )


def recipe_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~skipvlm.recipes.Recipe` of ``--recipe``, or None."""
    from skipvlm.recipes import get_recipe

    name = getattr(args, "recipe", None)
    return get_recipe(name) if name else None
