"""Run a function on several real processes (gloo by default) and collect what each rank returns.

    from tests.helpers.distributed import run_ranks
    results = run_ranks(my_worker, 2, case_args, timeout=60)   # [rank 0's return, rank 1's return]

`my_worker(rank, world_size, *args)` must live in an importable module (the ranks are spawned, not
forked) and return something `torch.save` can write and `torch.load(weights_only=True)` can read:
tensors, numbers, strings, lists, tuples and dicts of those. A rank that raises makes `run_ranks`
raise with that rank's traceback; ranks still running after `timeout` seconds are killed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_entry(
    rank: int,
    worker_fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    backend: str | None,
    timeout: float,
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    if backend is not None:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
    try:
        result = worker_fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if backend is not None and dist.is_initialized():
            dist.destroy_process_group()
    # The rank's result is saved: leave without the interpreter's teardown, where a background thread that
    # gloo or DeepSpeed left running was seen (rarely) to abort a finished rank ("terminate called without
    # an active exception"). A failing worker raised above and never gets here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    worker_fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str | None = "gloo",
) -> list[Any]:
    """Spawn `world_size` processes running `worker_fn(rank, world_size, *args)`; return results by rank.

    Each process gets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK set, one torch thread, and,
    unless `backend=None` (e.g. for code that calls `deepspeed.init_distributed` itself), an
    initialised default process group of `backend`.
    """
    with tempfile.TemporaryDirectory(prefix="run_ranks_") as out_dir:
        context = mp.start_processes(
            _rank_entry,
            args=(worker_fn, world_size, free_port(), out_dir, backend, timeout, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a rank failed
            if time.monotonic() >= deadline:
                alive = [rank for rank, proc in enumerate(context.processes) if proc.is_alive()]
                for proc in context.processes:
                    if proc.is_alive():
                        proc.kill()
                        proc.join()
                raise TimeoutError(
                    f"ranks {alive} of {world_size} still running after {timeout:.0f} s; killed them"
                )
        return [
            torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True)
            for rank in range(world_size)
        ]


def small_run(out_dir) -> dict:
    """The config overrides every training run of the tests shares: output in ``out_dir``, batches of 8,
    one loader process, a short shuffle buffer, a log line per step, no evaluation before the last step."""
    return {
        "run.out_dir": str(out_dir),
        "data.batch_size": 8,
        "data.num_workers": 1,
        "data.shuffle_buffer": 32,
        "run.log_every": 1,
        "run.eval_every": 0,
    }


def start_run(cmd: list[str]) -> subprocess.Popen:
    """Start the command ``cmd`` as a user's run starts (the launch environment, from the repository root),
    in a session of its own with its output piped: what :func:`kill_at_checkpoint` kills with its ranks."""
    from training.runner.launch import launch_env
    from training.runner.paths import ROOT

    return subprocess.Popen(
        cmd,
        env=launch_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_at_checkpoint(proc, out_dir, tag: str, timeout: float = 180.0) -> None:
    """SIGKILL the run ``proc`` (started by :func:`start_run`) and its ranks as
    soon as ``out_dir`` has committed checkpoint ``tag`` (``step00000010``): the kill -9 of a
    kill-then-resume test. Fails when the run ends first or no such checkpoint comes within ``timeout``."""
    import signal
    from pathlib import Path

    marker = Path(out_dir) / "checkpoints" / "COMMITTED"
    deadline = time.time() + timeout
    while not (marker.exists() and marker.read_text().strip() == tag):
        assert proc.poll() is None, "run ended before its first checkpoint: " + proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"no checkpoint within {timeout:.0f} s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
