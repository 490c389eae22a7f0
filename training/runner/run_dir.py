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
    host is refused too (its liveness cannot be checked from here): delete it once that run is gone."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _owner(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            return json.loads(os.read(fd, 1 << 16).decode() or "{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(fd)
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
    """What an earlier run left in ``out_dir`` (checkpoints, metrics, export), by name."""
    ckpt = out_dir / "checkpoints"
    found = sorted(p.name for p in ckpt.glob("step*")) if ckpt.is_dir() else []
    return found + [name for name in ("metrics.jsonl", "export") if (out_dir / name).exists()]


def prepare(out_dir: Path, *, resume: str | None, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding a previous run unless ``overwrite`` (which removes it)."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    left = previous_run(out_dir)
    if not left or resume:
        return
    if not overwrite:
        shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
        raise RunDirError(
            f"{out_dir} holds a previous run ({shown}): pass --resume to continue it, "
            f"--overwrite to replace it, or choose another run.out_dir"
        )
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
