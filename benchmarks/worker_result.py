"""The hand-over between a benchmark and its torchrun workers: rank 0 prints one ``RESULT {json}`` line,
the launching process runs the ranks and reads that line back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PREFIX = "RESULT "


def print_result(record: dict) -> None:
    """On rank 0 of a worker: hand ``record`` to the launching process."""
    print(_PREFIX + json.dumps(record), flush=True)


def run_for_result(ranks: int, target: list[str], *, timeout: float, what: str) -> dict:
    """Run the script and arguments ``target`` on ``ranks`` processes (torchrun, the launch environment of
    a training run) and return its rank 0's record; a run that printed none fails, naming ``what``, with
    the tail of its output."""
    from training.runner.launch import launch_env, torchrun_command

    out = subprocess.run(
        torchrun_command(ranks, target),
        env=launch_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in out.stdout.splitlines():
        if line.startswith(_PREFIX):
            return json.loads(line[len(_PREFIX) :])
    raise RuntimeError(f"{what} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
