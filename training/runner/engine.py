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

from vision_tower.hardware import choose_precision, keep_freed_cpu_memory
from vision_tower.layers import no_weight_decay_names

from .config import OptimSection, RunSection, resolve_path

# torch's c10d warns at every call of the collectives DeepSpeed's ZeRO uses (each step, each checkpoint)
_DEPRECATED_COLLECTIVES = (
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor|_all_gather_base"
    r"|_reduce_scatter_base)` is deprecated"
)


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


def leave_process_group() -> None:
    """Leave the process group after a failed run, and forget DeepSpeed's copy of its world group: a later
    run in the same process (the Python API, tests) would otherwise find that stale group ("Group ... is not
    registered") when its engine starts."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.destroy_process_group()
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None  # the clone DeepSpeed keeps of the world group it was given


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_weight_decay_params(model: nn.Module) -> set[int]:
    """ids of the parameters the model excludes from weight decay: every 0/1-d tensor (biases, norms,
    t', b) and those a module names in its ``no_weight_decay()`` (position tables, probes). The rule is
    :func:`vision_tower.layers.no_weight_decay_names`, which ``VisionLanguageModel.no_weight_decay`` gives."""
    return {id(model.get_parameter(name)) for name in no_weight_decay_names(model)}


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


@dataclass(frozen=True)
class TrainPrecision:
    """How a run computes, and why.

    ``fp32``; ``bf16-autocast``: DeepSpeed's ``torch_autocast`` (matmuls and convolutions in bf16, the
    fp32 weights are the master copy, t', b and the loss stay fp32), what ``run.precision`` picks; or
    ``bf16-deepspeed``: DeepSpeed's bf16 mode (bf16 weights, fp32 master copies in the optimizer), only
    when the DeepSpeed JSON sets ``bf16.enabled: true``.
    """

    mode: str
    reason: str

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype floating inputs are cast to before the forward."""
        return torch.bfloat16 if self.mode == "bf16-deepspeed" else torch.float32

    def describe(self) -> str:
        return f"precision: {self.mode} ({self.reason})"

    def record(self) -> dict[str, str]:
        """Entries for ``metrics.jsonl``."""
        return {"precision": self.mode, "precision_reason": self.reason}


def training_precision(run: RunSection, ds: dict[str, Any] | None = None) -> TrainPrecision:
    """``run.precision`` (auto: bf16 on CUDA and on CPUs with native bf16 matmul, see
    :func:`vision_tower.hardware.choose_precision`) checked against the DeepSpeed JSON ``ds`` (read from
    ``run.deepspeed`` when not given), whose ``bf16.enabled`` may be ``"auto"``, or agree with it."""
    ds = _read_json(run.deepspeed) if ds is None else ds
    if "torch_autocast" in ds:
        raise ValueError(f"{run.deepspeed}: remove torch_autocast, run.precision sets it")
    have = ds.get("bf16", {}).get("enabled", "auto")
    if have not in ("auto", True, False):
        raise ValueError(f'{run.deepspeed}: bf16.enabled must be true, false or "auto", got {have!r}')
    if have != "auto":
        if run.precision != "auto" and have != (run.precision == "bf16"):
            raise ValueError(
                f"{run.deepspeed}: bf16.enabled={have} but run.precision={run.precision}; "
                f'set it to "auto" in the JSON'
            )
        return TrainPrecision(
            "bf16-deepspeed" if have else "fp32", f"{run.deepspeed} sets bf16.enabled={have}"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = choose_precision({"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[run.precision], device)
    reason = choice.reason if run.precision == "auto" else f"run.precision={run.precision}"
    return TrainPrecision("bf16-autocast" if choice.is_bf16 else "fp32", reason)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(resolve_path(path), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def deepspeed_config(
    optim: OptimSection, run: RunSection, micro_batch: int, world_size: int
) -> dict[str, Any]:
    """The run's DeepSpeed JSON with the batch, accumulation, clipping and precision filled in.

    Entries the JSON sets to ``"auto"`` (or leaves out) come from the run config; a number
    that disagrees with the run config is an error. Precision: see :func:`training_precision`.
    """
    ds = _read_json(run.deepspeed)
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
                f'{run.deepspeed}: {key}={have} but the run config gives {value}; set it to "auto" in the '
                "JSON"
            )
        ds[key] = value
    mode = training_precision(run, ds).mode
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": mode == "bf16-deepspeed"}
    if mode == "bf16-autocast":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError("fp16 is not supported: use run.precision bf16 or fp32")
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
    precision: TrainPrecision
    compiled: int = 0  # how many blocks run under torch.compile (run.compile)
    allocator: str = ""  # what keep_freed_cpu_memory did (CPU training), or "" on a GPU

    @property
    def stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype floating inputs are cast to (fp32 under autocast, which casts inside the forward)."""
        return self.precision.input_dtype

    def describe(self) -> str:
        """The first lines a run prints: precision, compilation and (on CPU) the allocator, and why."""
        compiled = f"on, {self.compiled} repeated blocks" if self.compiled else "off"
        lines = [self.precision.describe(), f"compile: {compiled}"]
        return "\n".join(lines + [self.allocator] if self.allocator else lines)

    def record(self) -> dict[str, Any]:
        """Entries for ``metrics.jsonl``."""
        return {**self.precision.record(), "compiled_blocks": self.compiled, "allocator": self.allocator}


def compile_repeated_blocks(model: nn.Module) -> int:
    """``torch.compile`` each block of every ``nn.ModuleList`` of same-class blocks, in place (parameter
    names and DeepSpeed's hooks stay as they are); the rest of the model, the loss included, stays eager.
    Every block of a stack shares one compiled graph. Returns how many blocks were compiled."""
    n = 0
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module)
            and all(type(m) is type(module[0]) for m in module)
        ):
            for block in module:
                block.compile()
                n += 1
    return n


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
    if engine.world_size == 1 and zero_stage(ds_config) == 0:
        # DeepSpeed would still flatten every gradient into one buffer and back after each backward, to
        # average it over ranks: with one rank that is the identity, and at B/16 it was a fifth of the step
        engine.enable_backward_allreduce = False
    compiled = compile_repeated_blocks(engine.module) if run.compile else 0
    allocator = keep_freed_cpu_memory() if engine.device.type == "cpu" else ""  # from here on, every step
    return Engine(engine, optimizer, scheduler, ds_config, training_precision(run), compiled, allocator)
