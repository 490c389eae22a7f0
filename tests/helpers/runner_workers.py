"""Rank workers for the runner's own tests (spawned by tests.helpers.distributed.run_ranks): a task with a
one-layer model and a loader whose data accounting differs by rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.runner import Task
from training.runner.config import OptimSection, RunSection


class CountingLoader:
    """Endless batches of one tensor; rank r reports r + 1 bad images (and rank 1 two empty captions)
    skipped, and 10 (r + 1) truncated texts of 100 (r + 1) seen."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.skip_counts = {"bad_image": rank + 1, **({"empty_caption": 2} if rank == 1 else {})}
        self.truncated_captions = 10 * (rank + 1)
        self.samples_seen = 100 * (rank + 1)

    def __iter__(self):
        while True:
            yield {"x": torch.ones(2, 4)}

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    def state_dict(self) -> dict[str, Any]:
        return {}


class CountingTask(Task):
    """A linear layer trained on :class:`CountingLoader`'s batches; nothing evaluated or exported."""

    def __init__(self, out_dir: str) -> None:
        self.optim = OptimSection(lr=1e-3, warmup_steps=0)
        self.run = RunSection(
            out_dir=out_dir,
            steps=2,
            deepspeed="configs/deepspeed/zero0.json",
            precision="fp32",
            log_every=1,
            save_every=0,
        )
        self.micro_batch_size = 2

    def build_model(self, zero) -> nn.Module:
        return nn.Linear(4, 1)

    def build_loader(self, rank: int, world: int, resume_state):
        return CountingLoader(rank)

    def loss(self, engine, batch):
        return engine(batch["x"]).square().mean()

    def export(self, model, ctx):
        return None


def counters_worker(rank: int, world: int, out_dir: str) -> dict:
    """``train`` of :class:`CountingTask`; the records rank 0 wrote to metrics.jsonl."""
    from training.runner import train

    train(CountingTask(out_dir))
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"logged": [r for r in rows if "loss" in r and not r.get("final")], "final": rows[-1]}
