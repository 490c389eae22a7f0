"""The ``vision-tower`` command."""

from __future__ import annotations

import argparse
import sys

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"vision-tower {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
