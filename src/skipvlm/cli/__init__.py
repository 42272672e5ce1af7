"""The ``skipvlm`` command line. Each subcommand parses its arguments and calls one library function.

One module per group of commands: :mod:`~skipvlm.cli.toy` (showcase, demo, study, toy),
:mod:`~skipvlm.cli.training` (search, train, eval, merge), :mod:`~skipvlm.cli.tokens` (generate,
calibrate-vtw, train-dyvte) and :mod:`~skipvlm.cli.measure` (cost, bench); the options they share are
defined once in :mod:`~skipvlm.cli.options`, and what they load in :mod:`~skipvlm.cli.loading`. This
module builds the parser, claims each command's output folder and turns errors into one line.
"""

from __future__ import annotations

import argparse
import os
import sys

from skipvlm import __version__
from skipvlm.cli import measure, tokens, toy, training

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``skipvlm`` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="skipvlm",
        description="Skip redundant attention in multimodal LLMs and measure what it buys.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"skipvlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (toy, training, tokens, measure):
        group.register(sub)
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
    "study": ("run", {"study.json": "file", "tables.md": "file", "jobs": "dir"}, False),
    "cost": ("run", {}, True),
    "bench": ("run", {}, True),
}


def _command_name(args: argparse.Namespace) -> str:
    return args.command if args.command != "toy" else f"toy {args.toy_command}"


def _run(args: argparse.Namespace) -> int:
    """Run the command, holding its --out (checked and locked) while it runs."""
    from skipvlm.outputs import claim_output

    command = _command_name(args)
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
    name = _command_name(args)
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
