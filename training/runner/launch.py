"""Start several local ranks with torchrun (``python -m torch.distributed.run``), one thread each."""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import ROOT


def torchrun_command(ranks: int, target: list[str]) -> list[str]:
    """``target`` is ``["-m", "module", ...args]`` or ``["script.py", ...args]``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *target,
    ]


def launch_env() -> dict[str, str]:
    """The environment for local CPU ranks: one thread per rank, DeepSpeed's CPU accelerator when no GPU."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def launch(ranks: int, cli_args: list[str], timeout: float | None = None) -> None:
    """Run ``vision-tower CLI_ARGS`` on ``ranks`` local ranks in the working directory; raises
    ``subprocess.CalledProcessError`` if any rank fails."""
    cmd = torchrun_command(ranks, ["-m", "vision_tower.cli", *cli_args])
    subprocess.run(cmd, env=launch_env(), check=True, timeout=timeout)
