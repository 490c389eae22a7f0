"""Run checkpoints: DeepSpeed engine state plus each rank's data position and RNG, committed atomically.

A checkpoint ``<out>/checkpoints/step00000100/`` counts only once every rank has written it and
rank 0 has replaced ``<out>/checkpoints/COMMITTED`` (write to a temporary file, then
``os.replace``), so a crash while writing leaves the previous checkpoint as the one to resume.

Every rank must see the same ``out_dir`` (a shared filesystem across nodes): rank 0 decides
which checkpoint to resume and every rank reads it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMMITTED = "COMMITTED"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, rank: int, data_state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of ``step`` on every rank, then commit it on rank 0 and prune old ones."""
    tag = tag_for(step)
    world = dist.get_world_size() if dist.is_initialized() else 1
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"step": step, "world_size": world}, save_latest=False
    )
    folder = ckpt_dir / tag
    (folder / f"data_rank{rank}.json").write_text(json.dumps(data_state))
    rng = _rng_state()
    np_state = rng.pop("numpy")
    torch.save(
        {
            **rng,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
        },
        folder / f"rng_rank{rank}.pt",
    )
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / (COMMITTED + ".tmp")
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / COMMITTED)
        _prune(ckpt_dir, keep, tag)
    if dist.is_initialized():
        dist.barrier()
    return folder


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[: max(0, len(tags) - keep)]:
        if old != current:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def latest(ckpt_dir: Path) -> str | None:
    """The tag of the last committed checkpoint as rank 0 sees it (broadcast to all ranks), or None."""
    marker = ckpt_dir / COMMITTED
    tag = marker.read_text().strip() if marker.exists() else None
    tag = tag if tag and (ckpt_dir / tag).is_dir() else None
    if dist.is_initialized():
        box = [tag]
        dist.broadcast_object_list(box, src=0)
        tag = box[0]
    return tag


def load(engine, ckpt_dir: Path, tag: str, rank: int, world: int) -> tuple[int, dict[str, Any]]:
    """Restore engine, optimizer, scheduler, RNG; return (step, this rank's data state)."""
    folder = ckpt_dir / tag
    if not (folder / f"data_rank{rank}.json").exists():
        saved = sorted(p.name for p in folder.glob("data_rank*.json"))
        raise RuntimeError(
            f"checkpoint {folder} has no data position for rank {rank} of {world} (it holds {saved}): resume "
            f"with the world size it was saved with, on a filesystem every rank sees"
        )
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder} (model state files missing?)")
    if client.get("world_size", world) != world:
        raise RuntimeError(
            f"checkpoint {folder} was saved by {client['world_size']} ranks, this run has {world}: "
            f"exact resume needs the same world size"
        )
    data_state = json.loads((folder / f"data_rank{rank}.json").read_text())
    rng = torch.load(folder / f"rng_rank{rank}.pt", weights_only=True)
    np_state = rng["numpy"]
    rng["numpy"] = (np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:])
    rng["python"] = (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])
    _set_rng_state(rng)
    return int(client["step"]), data_state
