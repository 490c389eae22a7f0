"""Errors shared by modules that must not import each other, and which rank of a multi-process run says an
expected error.

Under a launcher (torchrun, deepspeed) every rank runs the same command on the same files: until the ranks
work on their own data, a bad input stops every rank with the same message, and rank 0 alone says it.
From the moment a training loop hands each rank its own shards (:func:`ranks_diverge`), an error may be
one rank's alone (its shards, its disk), and that rank says it with its number, unless the error was
agreed over the ranks (:func:`agreed`: every rank raises the message rank 0 chose).
"""

from __future__ import annotations

import os

_state = {"diverged": False}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the keys that are missing, unexpected or mis-shaped."""


def ranks_diverge() -> None:
    """From now on, this process works on its own share of the data: its errors may be its own."""
    _state["diverged"] = True


def agreed(err: BaseException) -> BaseException:
    """Mark ``err`` as raised with the same message on every rank (returns it, to ``raise agreed(...)``)."""
    err.on_every_rank = True  # type: ignore[attr-defined]
    return err


def launcher_rank() -> int:
    """This process's rank as the launcher set it (``RANK``); 0 outside a launcher."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def speaker_prefix(err: BaseException) -> str | None:
    """What goes before this process's one-line error: ``""`` for rank 0 (and a single process),
    ``"rank N: "`` for another rank whose error may be its own, None where rank 0 says the same line."""
    rank = launcher_rank()
    if rank == 0:
        return ""
    if _state["diverged"] and not getattr(err, "on_every_rank", False):
        return f"rank {rank}: "
    return None
