"""One run per ``run.out_dir``: a lock file naming the owner, and what a fresh, resumed or
overwriting run may do with what an earlier run left there."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

LOCK = "LOCK"
# what a run writes into out_dir (an --overwrite removes these, nothing else)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "config.json", "export")


class RunDirError(ValueError):
    """The out_dir is in use, or holds a run this command was not told what to do with."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """``out_dir/LOCK``: an exclusive ``flock`` held for the run's life, the file naming the owner (host,
    pid, start time). The kernel drops the lock when its owner dies however it dies, so a dead run's lock
    is taken over with no guessing from pids; a live owner is refused with its pid. A file naming another
    host is refused too (its liveness cannot be checked from here): delete it once that run is gone. A
    ``LOCK`` holding anything but such a record is not a run's: refused, never truncated or deleted."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _owner(self, fd: int) -> dict[str, Any] | None:
        """The record a run wrote into the file ({} while it is empty), or None when the file holds
        something else (not a lock of ours: it is never taken over or deleted)."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        if not raw.strip():
            return {}
        try:
            record = json.loads(raw.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) and {"host", "pid"} <= record.keys() else None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd) or {}
                os.close(fd)
                raise RunDirError(
                    f"{self.path.parent} is used by another run (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}): wait for it, or choose another run.out_dir"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # its owner released (unlinked) it between our open and flock: again
                os.close(fd)
                continue
            owner = self._owner(fd)
            if owner is None:
                os.close(fd)
                raise RunDirError(
                    f"{self.path} is not a run's lock (it holds other data): left as it is; move it away "
                    f"or choose another run.out_dir"
                )
            if owner and owner.get("host") != me["host"]:
                os.close(fd)
                raise RunDirError(
                    f"{self.path.parent} is used by a run on host {owner.get('host')} (pid "
                    f"{owner.get('pid')}); "
                    f"if that run is gone, delete {self.path}"
                )
            os.ftruncate(fd, 0)  # a dead owner's record (its lock died with it), or nothing
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise RunDirError(f"{self.path}: other runs keep taking and releasing the lock; try again")

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter sees its inode is gone
            os.close(self._fd)
            self._fd = None


def previous_run(out_dir: Path) -> list[str]:
    """What of a run's outputs ``out_dir`` holds, by name (checkpoints by step): whatever wrote them, a
    fresh run would replace them."""
    ckpt = out_dir / "checkpoints"
    steps = sorted(p.name for p in ckpt.glob("step*")) if ckpt.is_dir() else []
    found = steps or (["checkpoints/"] if ckpt.exists() else [])
    for name in RUN_OUTPUTS:
        if name != "checkpoints" and (out_dir / name).exists():
            found.append(name + "/" if (out_dir / name).is_dir() else name)
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def inputs_removed(out_dir: Path, inputs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (config key, path) of ``inputs`` that lie inside what ``--overwrite`` removes from ``out_dir``
    (its :data:`RUN_OUTPUTS`), symbolic links followed."""
    removed = [(out_dir / name).resolve() for name in RUN_OUTPUTS if (out_dir / name).exists()]
    found = []
    for key, path in inputs:
        real = Path(path).resolve()
        if any(_inside(real, r) for r in removed):
            found.append((key, path))
    return found


def refuse_removing_inputs(out_dir: Path, inputs: list[tuple[str, str]]) -> None:
    """An ``--overwrite`` must not remove one of the run's ``inputs`` (config key, path)."""
    doomed = inputs_removed(out_dir, list(inputs))
    if doomed:
        key, path = doomed[0]
        more = f" (and {', '.join(k for k, _ in doomed[1:])})" if len(doomed) > 1 else ""
        raise RunDirError(
            f"{key} {path} lies inside what --overwrite would remove from {out_dir}{more}: nothing was "
            f"removed; write this run to another run.out_dir, or move the input out first"
        )


def prepare(
    out_dir: Path, *, resume: str | None, overwrite: bool, inputs: list[tuple[str, str]] = ()
) -> None:
    """Refuse a fresh run into a folder holding any of a run's outputs unless ``overwrite`` (which removes
    them), and an ``overwrite`` that would remove one of the run's ``inputs`` (config key, path)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    left = previous_run(out_dir)
    if not left or resume:
        return
    if not overwrite:
        shown = ", ".join(left[:6]) + (", ..." if len(left) > 6 else "")
        raise RunDirError(
            f"{out_dir} holds a run's outputs ({shown}): --overwrite replaces them, --resume continues "
            f"that run; or choose another run.out_dir"
        )
    refuse_removing_inputs(out_dir, inputs)
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
