"""DeepSpeed set-up: process group, parameter groups, schedule, engine. The only file that
knows about the distribution strategy (the model code never imports DeepSpeed)."""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from .config import PretrainConfig, resolve_path

# Parameters that never get weight decay besides every 0/1-d tensor (biases, norms, t', b).
NO_DECAY_NAMES = ("pos_embed", "probe")


def quiet_deepspeed() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed.*")
    # The shared-memory op is only used by inference all-reduce and needs a C++ build: skip it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by the launcher (torchrun or deepspeed); (rank, world size).

    A plain single process (no launcher variables) runs as rank 0 of 1.
    """
    quiet_deepspeed()
    import deepspeed

    for key, default in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, default)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms,
    position tables, the pooling probe, t' and b)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(part in name for part in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(cfg: PretrainConfig) -> bool:
    if cfg.run.precision == "auto":
        return torch.cuda.is_available()
    return cfg.run.precision == "bf16"


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed JSON with the batch, accumulation, clipping and precision filled in.

    Entries the JSON sets to ``"auto"`` (or leaves out) come from the run config; a number
    that disagrees with the run config is an error.
    """
    with open(resolve_path(cfg.run.deepspeed), encoding="utf-8") as f:
        ds = json.load(f)
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ValueError(
                f"{cfg.run.deepspeed}: {key}={have} but the run config gives {value}; "
                f'set it to "auto" in the JSON'
            )
        ds[key] = value
    bf16, have = use_bf16(cfg), ds.get("bf16", {}).get("enabled", "auto")
    if have != "auto" and cfg.run.precision != "auto" and have != bf16:
        raise ValueError(
            f"{cfg.run.deepspeed}: bf16.enabled={have} but run.precision={cfg.run.precision}; "
            f'set it to "auto" in the JSON'
        )
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": bf16 if have == "auto" else have}
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError("fp16 is not supported: use bf16 (GPU) or fp32")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    if ds.get("zero_optimization", {}).get("offload_optimizer"):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def build_engine(model: nn.Module, cfg: PretrainConfig, world_size: int):
    """``deepspeed.initialize`` with a plain AdamW (nothing to compile) and the warm-up + cosine schedule."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler, ds_config
