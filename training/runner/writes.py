"""Saves that fail cleanly: a checkpoint or export whose write fails (a full disk above all) is removed and
reported in one line (what, where, free space, how much the save needed), never left half-written; exports
are written into a temporary sibling folder and renamed into place, their files given the user's umask."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from vision_tower.checkpoint import current_umask

# torch's zip writer reports a failed write without its errno ("unexpected pos", "file write failed");
# safetensors wraps the OS error in its own exception type
_WRITER_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")
_NO_SPACE = re.compile(r"No space left on device|os error 28|StorageFull|Disk quota exceeded|os error 122")
ROOM_MARGIN = 16 << 20  # a failed write with less room than this left (and than the save needed): full


class SaveFailed(OSError):
    """A checkpoint or export could not be written; what it had written is removed."""


def is_write_error(err: BaseException) -> bool:
    """``err`` came from writing a file: an ``OSError``, torch's writer, or safetensors' wrapping of an OS
    error (other errors are bugs and keep their traceback)."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return bool(_WRITER_FAILED.search(text) or _NO_SPACE.search(text)) or (
        type(err).__name__ == "SafetensorError" and "serializ" in text
    )


def free_bytes(path: Path) -> int | None:
    """Room left on ``path``'s filesystem for this user (its nearest existing folder's), or None."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(err: BaseException, free: int | None, needed: int | None) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if _NO_SPACE.search(str(err)):
        return True
    return free is not None and free < max(needed or 0, ROOM_MARGIN)


def size_text(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def failure_line(what: str, where: Path, err: BaseException, needed: int | None, after: str) -> str:
    """One line: the disk is full (or the write failed), where, how much room was left and needed,
    what was removed and what still holds."""
    free = free_bytes(where)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if is_disk_full(err, free, needed):
        head = f"the disk is full: {what} could not be written to {where}"
    else:
        head = f"{what} could not be written to {where} ({type(err).__name__}: {first})"
    room = [f"{size_text(free)} free there"] if free is not None else []
    if needed:
        room.append(f"the save needs about {size_text(needed)}")
    return head + (f" ({'; '.join(room)})" if room else "") + f": {after}"


def honour_umask(folder: Path) -> None:
    """Files and folders under ``folder`` given the modes the user's umask allows (safetensors' writer
    creates its files 0600, a temporary folder is 0700: unreadable to the other users of a shared
    machine)."""
    mask = current_umask()
    for p in [Path(folder), *Path(folder).rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_folder(target: Path, what: str, needed: int | None = None) -> Iterator[Path]:
    """A temporary sibling of ``target`` to write into; on success it replaces ``target`` (renamed into
    place, an earlier ``target`` removed after), on failure it is removed and ``target`` is left as it
    was. A write error becomes :class:`SaveFailed` with one line (see :func:`failure_line`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        honour_umask(tmp)
    except BaseException as err:
        line = None
        if isinstance(err, Exception) and is_write_error(err):
            kept = f"{target} is as it was" if target.exists() else f"no {target.name} was written"
            line = failure_line(what, target, err, needed, f"removed the partial write; {kept}")
        shutil.rmtree(tmp, ignore_errors=True)
        if line is None:
            raise
        raise SaveFailed(line) from err
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
