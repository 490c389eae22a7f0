"""Rank workers for the pretraining tests (spawned by tests.helpers.distributed.run_ranks)."""

from __future__ import annotations

import itertools

import torch

from training.runner.paths import ROOT
from training.tasks.siglip_config import load_config


def siglip_engine(overrides: list[str], world: int):
    """The SigLIP task and its DeepSpeed engine, built as `vision-tower pretrain` builds them."""
    import torch.distributed as dist

    from training.runner import build_task_engine
    from training.tasks.siglip import SiglipTask

    cfg = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["data.train_shards=unused", *overrides])
    task = SiglipTask(cfg)
    torch.manual_seed(cfg.run.seed)
    engine, zero = build_task_engine(task, dist.get_rank(), world)
    return task, engine, zero


def loss_steps_worker(
    rank: int, world: int, pixels: torch.Tensor, ids: torch.Tensor, steps: int
) -> list[float]:
    """The training step of `vision-tower pretrain` (`training.runner.train_step`: ZeRO-2 engine, model
    forward with the multi-rank loss) on this rank's rows of a fixed global batch; returns the global
    loss (mean over ranks) per step."""
    from training.runner import init_distributed, mean_over_ranks, train_step

    init_distributed()
    local = pixels.shape[0] // world
    task, engine, _ = siglip_engine(
        [
            f"data.batch_size={local}",
            "loss.chunk_size=3",
            "optim.warmup_steps=0",
            "optim.lr=1e-3",
            "run.deepspeed=configs/deepspeed/zero2.json",
            "run.precision=fp32",  # exact equality across rank counts; auto may pick bf16 autocast
        ],
        world,
    )
    rows = slice(rank * local, (rank + 1) * local)
    batches = itertools.repeat({"pixel_values": pixels[rows], "input_ids": ids[rows]})
    return [mean_over_ranks(train_step(engine, batches, task.loss).loss) for _ in range(steps)]


def zero3_build_worker(rank: int, world: int, overrides: list[str]) -> dict:
    """Build the SigLIP model as `vision-tower pretrain` does at ZeRO-3; report how many parameter
    elements this rank holds, the total, and the full weights gathered one parameter at a time."""
    from training.runner import init_distributed

    init_distributed()
    _, engine, zero = siglip_engine(["run.deepspeed=configs/deepspeed/zero3.json", *overrides], world)
    module = engine.engine.module
    held = sum(p.ds_tensor.numel() for p in module.parameters())
    total = sum(p.ds_numel for p in module.parameters())
    return {"held": held, "total": total, "state": zero.state_dict(module)}
