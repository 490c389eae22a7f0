"""DeepSpeed set-up: process group, parameter groups, schedule, engine. The runner's only contact with
the distribution strategy (model code never imports DeepSpeed). It reads the ``optim`` and ``run``
sections and the micro-batch size, never a task's whole config."""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import OptimSection, RunSection, resolve_path

# torch's c10d warns at every call of the collectives DeepSpeed's ZeRO uses (each step, each checkpoint)
_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base|_reduce_scatter_base)` is deprecated"


def quiet_deepspeed() -> None:
    """CPU accelerator when there is no GPU, no per-step deprecation warnings, no C++ build at start."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"deepspeed.*")
    warnings.filterwarnings("ignore", message=_DEPRECATED_COLLECTIVES, category=FutureWarning)
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


def no_weight_decay_params(model: nn.Module) -> set[int]:
    """ids of the parameters the modules exclude from weight decay: every 0/1-d tensor (biases, norms,
    t', b) and those a module names in its ``no_weight_decay()`` (position tables, probes)."""
    ids = {id(p) for p in model.parameters() if p.ndim < 2 and _full_ndim(p) < 2}
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            for name in names():
                ids.add(id(module.get_parameter(name)))
    return ids


def _full_ndim(p: torch.Tensor) -> int:
    """The parameter's own number of dimensions (ZeRO-3 partitions keep it in ``ds_shape``)."""
    return len(getattr(p, "ds_shape", p.shape))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and not decayed (see ``no_weight_decay_params``).
    Frozen parameters are left out, so they hold no optimizer state."""
    skip = no_weight_decay_params(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def use_bf16(run: RunSection) -> bool:
    if run.precision == "auto":
        return torch.cuda.is_available()
    return run.precision == "bf16"


def deepspeed_config(
    optim: OptimSection, run: RunSection, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """The run's DeepSpeed JSON with the batch, accumulation, clipping and precision filled in.

    Entries the JSON sets to ``"auto"`` (or leaves out) come from the run config; a number
    that disagrees with the run config is an error.
    """
    path = resolve_path(run.deepspeed)
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{run.deepspeed}: not valid JSON (line {err.lineno}: {err.msg})") from None
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": micro_batch * optim.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ValueError(
                f'{run.deepspeed}: {key}={have} but the run config gives {value}; set it to "auto" in the JSON'
            )
        ds[key] = value
    bf16, have = use_bf16(run), ds.get("bf16", {}).get("enabled", "auto")
    if have != "auto" and run.precision != "auto" and have != bf16:
        raise ValueError(
            f"{run.deepspeed}: bf16.enabled={have} but run.precision={run.precision}; "
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


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@dataclass
class Engine:
    """What ``deepspeed.initialize`` gives back, with the settings the loop needs."""

    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ds_config: dict[str, Any]

    @property
    def stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the forward runs in: inputs are cast to it."""
        return torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32


def build_engine(
    model: nn.Module,
    groups: list[dict[str, Any]],
    optim: OptimSection,
    run: RunSection,
    ds_config: dict[str, Any],
) -> Engine:
    """``deepspeed.initialize`` with a plain AdamW (nothing to compile) over ``groups`` and the
    warm-up + cosine schedule. ``ds_config`` comes from :func:`deepspeed_config`."""
    import deepspeed

    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim.warmup_steps, run.steps, optim.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return Engine(engine, optimizer, scheduler, ds_config)
