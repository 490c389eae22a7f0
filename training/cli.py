"""The ``vision-tower`` command."""

from __future__ import annotations

import argparse
import sys

import yaml

from .tower_commands import add_tower_commands
from .train_commands import add_train_commands
from .vlm_commands import add_vlm_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-tower",
        description="SigLIP vision towers: inspect, extract patch features, convert checkpoints, train.",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tower_commands(sub)
    add_train_commands(sub)
    add_vlm_commands(sub)
    return parser


# Failures a user's input can cause; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, yaml.YAMLError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (YAML's span several; a KeyError's str() adds quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def is_expected(err: BaseException) -> bool:
    """A user's input caused ``err``. A KeyError counts only when it carries a sentence (``unknown preset
    'x'; known presets: ...``): a bare missing key (``KeyError('top5')``) is a bug and keeps its traceback."""
    if isinstance(err, KeyError):
        return bool(err.args) and isinstance(err.args[0], str) and " " in err.args[0]
    return isinstance(err, EXPECTED_ERRORS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EXPECTED_ERRORS as err:
        if not is_expected(err):
            raise
        print(f"vision-tower {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
