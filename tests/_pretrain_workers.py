"""Rank workers for the pretraining tests (spawned by tests.distributed_utils.run_ranks)."""

from __future__ import annotations

import itertools

import torch

from training.config import ROOT, load_config


def siglip_engine(overrides: list[str], world: int):
    """The SigLIP task and its DeepSpeed engine, built as `vision-tower pretrain` builds them."""
    from training.runner import Zero, build_engine, deepspeed_config
    from training.runner.engine import zero_stage
    from training.tasks.siglip import SiglipTask

    cfg = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["data.train_shards=unused", *overrides])
    task = SiglipTask(cfg)
    ds_config = deepspeed_config(cfg.optim, cfg.run, cfg.data.batch_size, world)
    zero = Zero(zero_stage(ds_config), ds_config, *_rank_world())
    torch.manual_seed(cfg.run.seed)
    model = task.build_model(zero)
    return task, build_engine(model, task.param_groups(model), cfg.optim, cfg.run, ds_config), zero


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


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
        ],
        world,
    )
    rows = slice(rank * local, (rank + 1) * local)
    batches = itertools.repeat({"pixel_values": pixels[rows], "input_ids": ids[rows]})
    return [mean_over_ranks(train_step(engine, batches, task.loss).loss) for _ in range(steps)]
