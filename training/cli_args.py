"""Argument types and checks shared by the ``vision-tower`` subcommands: each bad value becomes one
``vision-tower <cmd>: error: ...`` line (argparse's for types, the command's for the checks)."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def check_new_output(path: str | os.PathLike, overwrite: bool, *, kind: str = "folder") -> None:
    """Refuse to write over what is there: a ``kind="file"`` output must not be a folder, a folder
    output must not be a file, and an existing file or non-empty folder needs ``--overwrite``."""
    out = Path(path)
    if kind == "file":
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the path of the file to write")
        if out.exists() and not overwrite:
            raise ValueError(f"{out} already exists; choose another path or pass --overwrite")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is a folder that is not empty; choose another path or pass --overwrite")


def clear_outputs(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the named files or folders inside ``folder`` (what a command wrote there before)."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def check_device(device: str | None) -> None:
    """A CUDA device needs CUDA: say so instead of failing deep inside torch."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (no GPU or no CUDA build of torch)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
