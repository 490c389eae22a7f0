"""One run per ``run.out_dir``: a lock file naming the owner, and what a fresh, resumed or
overwriting run may do with what an earlier run left there."""

from __future__ import annotations

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


def _alive(owner: dict[str, Any]) -> bool:
    pid = int(owner.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """``out_dir/LOCK`` holding host, pid and start time; created exclusively, released on exit.

    A lock whose owner is a dead process on this host is taken over; one held by a live process,
    or by another host (where liveness cannot be checked), is refused with the owner named.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me["host"])
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunDirError(f"{self.path}: another run took the lock at the same moment")

    def _take_over_if_stale(self, host: str) -> None:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (json.JSONDecodeError, UnicodeDecodeError):
            owner = {}  # cut short by a kill while it was written
        if owner and owner.get("host") != host:
            raise RunDirError(
                f"{self.path.parent} is used by a run on host {owner.get('host')} (pid {owner.get('pid')}); "
                f"if that run is gone, delete {self.path}"
            )
        if owner and _alive(owner):
            raise RunDirError(
                f"{self.path.parent} is used by another run (pid {owner['pid']} on {owner['host']}): "
                f"wait for it, or choose another run.out_dir"
            )
        self.path.unlink(missing_ok=True)  # its owner is dead: recover the lock

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


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
