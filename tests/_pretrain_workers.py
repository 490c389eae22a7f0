"""Rank workers for the pretraining tests (spawned by tests.distributed_utils.run_ranks)."""

from __future__ import annotations

import torch

from training.config import ROOT, load_config


def loss_steps_worker(
    rank: int, world: int, pixels: torch.Tensor, ids: torch.Tensor, steps: int
) -> list[float]:
    """The training step of `vision-tower pretrain` (ZeRO-2 engine, model forward with the multi-rank
    loss) on this rank's rows of a fixed global batch; returns the global loss (mean over ranks) per step."""
    from training.engine import build_engine, init_distributed
    from training.pretrain import _mean_over_ranks, build_model, make_loss_fn

    init_distributed()
    local = pixels.shape[0] // world
    cfg = load_config(
        ROOT / "configs/pretrain/demo_tiny.yaml",
        [
            "data.train_shards=unused",
            f"data.batch_size={local}",
            "loss.chunk_size=3",
            "optim.warmup_steps=0",
            "optim.lr=1e-3",
            "run.deepspeed=configs/deepspeed/zero2.json",
        ],
    )
    torch.manual_seed(0)
    engine, _, _, _ = build_engine(build_model(cfg), cfg, world)
    loss_fn = make_loss_fn(cfg, world)
    rows = slice(rank * local, (rank + 1) * local)
    losses = []
    for _ in range(steps):
        loss = engine(pixels[rows], ids[rows], loss_fn=loss_fn).loss
        losses.append(_mean_over_ranks(loss, world))
        engine.backward(loss)
        engine.step()
    return losses
