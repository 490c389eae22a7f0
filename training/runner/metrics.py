"""metrics.jsonl (one JSON record per line, rank 0 only) and the loss plot."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to ``metrics.jsonl``; a resumed run first drops what came after its checkpoint."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut off by a kill
        self.path.write_text("".join(r + "\n" for r in rows))


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a NaN on any rank makes it NaN). Collective."""
    value = value.detach().float().reshape(1).cpu().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Counters (e.g. skipped samples by reason) summed over all ranks, keys sorted; a key only some ranks
    have counts as 0 on the others. Collective: every rank calls it, and gets the totals."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(sorted(counts.items()))
    gathered: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def plot_loss(metrics_file: Path, png: Path, label: str = "loss") -> None:
    """The loss curve as a PNG (skipped with a log line if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss plot")
        return
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    pts = [
        (r["step"], r["loss"])
        for r in rows
        if "loss" in r and not r.get("final") and math.isfinite(r["loss"])
    ]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts))
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
