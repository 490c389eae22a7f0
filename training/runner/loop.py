"""The training loop every task runs: steps with accumulation and precision casting, the bad-step
guard, logging, evaluation and checkpoint cadence, resume, final checkpoint and export."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vision_tower.errors import agreed, ranks_diverge

from . import checkpoints, resume_check
from .engine import (
    Engine,
    build_engine,
    deepspeed_config,
    init_distributed,
    leave_process_group,
    zero_stage,
)
from .metrics import MetricsLog, mean_over_ranks, plot_loss, sum_over_ranks
from .run_dir import RunDirError, RunLock, prepare, refuse_removing_inputs
from .task import ExportContext, Loader, Task
from .zero import Zero, barrier

log = logging.getLogger(__name__)
LossFn = Callable[..., torch.Tensor]  # (module, batch[, num_items_in_batch=]) -> scalar loss
ItemsFn = Callable[[dict[str, Any]], int]  # batch -> number of terms its loss averages over


class TrainingDiverged(ValueError):
    """``run.max_bad_steps`` non-finite or skipped steps in a row: the run stops without saving."""


def prepare_batch(batch: dict[str, Any], dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Tensors moved to ``device``; floating ones cast to ``dtype`` (what the engine trains in)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over the micro-batches, fp32 on CPU
    skipped: bool  # DeepSpeed skipped the optimizer step (non-finite gradients)


def train_step(
    engine: Engine, batches: Iterator[dict[str, Any]], loss_fn: LossFn, items_fn: ItemsFn | None = None
) -> StepResult:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches from ``batches``, each cast to the
    engine's precision, through ``loss_fn(module, batch)``, backward, and DeepSpeed's step (which updates
    at the accumulation boundary). The step that training, tests and benchmarks all run.

    ``items_fn(batch)``, for a loss that is a mean over a number of terms that varies between batches
    (answer tokens), counts them: the step's micro-batches are drawn first and their counts summed over
    micro-batches and ranks, and ``loss_fn(module, batch, num_items_in_batch=n)`` is called with ``n`` that
    count over (ranks x micro-batches), to divide its sum of terms by. DeepSpeed averages the losses over
    micro-batches and ranks, so the step then follows the mean over every term of the global batch, as one
    process holding it whole would, and the loss logged (averaged over ranks) is that mean."""
    ds = engine.engine
    before = ds.skipped_steps
    total = torch.zeros(())
    accum = ds.gradient_accumulation_steps()
    micro, kwargs = None, {}
    if items_fn is not None:
        micro = [next(batches) for _ in range(accum)]
        count = torch.tensor(float(sum(items_fn(b) for b in micro)), device=ds.device)
        world = 1
        if dist.is_initialized():
            dist.all_reduce(count)
            world = dist.get_world_size()
        kwargs["num_items_in_batch"] = count.item() / (world * accum)
    for i in range(accum):
        batch = prepare_batch(next(batches) if micro is None else micro[i], engine.dtype, ds.device)
        loss = loss_fn(ds, batch, **kwargs)
        ds.backward(loss)
        ds.step()
        total += loss.detach().float().cpu()
    return StepResult(total / accum, ds.skipped_steps > before)


def build_task_engine(task: Task, rank: int, world: int) -> tuple[Engine, Zero]:
    """The DeepSpeed config from the task's ``optim``/``run`` sections, the task's model built under it
    (partitioned at ZeRO-3), and the engine over the task's parameter groups."""
    ds_config = deepspeed_config(task.optim, task.run, task.micro_batch_size, world)
    zero = Zero(zero_stage(ds_config), ds_config, rank, world)
    model = task.build_model(zero)
    return build_engine(model, task.param_groups(model), task.optim, task.run, ds_config), zero


def _agree(fn: Callable[[], None], rank: int) -> None:
    """Run ``fn`` on rank 0; if it refuses (``ValueError``), every rank raises the same error."""
    message = None
    if rank == 0:
        try:
            fn()
        except ValueError as err:
            message = (type(err), str(err))
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise agreed(message[0](message[1]))


def _data_counts(loader: Loader) -> dict[str, float | int]:
    """What the data pipeline dropped or cut so far, over all ranks: ``skipped`` samples, and texts kept but
    cut to the tokenizer's length (``truncated_captions``, ``truncated_share`` of the samples seen).
    Collective."""
    total = sum_over_ranks(
        {
            "skipped": loader.skipped,
            "truncated_captions": loader.truncated_captions,
            "samples": loader.samples_seen,
        }
    )
    seen = total.pop("samples")
    return {**total, "truncated_share": round(total["truncated_captions"] / seen, 6) if seen else 0.0}


def train(
    task: Task, *, resume: str | None = None, overwrite: bool = False, allow_changes: bool = False
) -> dict[str, Any]:
    """Run ``task`` (or resume it: ``resume="latest"`` needs a checkpoint, ``"auto"`` starts fresh without
    one); returns the final metrics on every rank. One run per ``run.out_dir`` at a time. A resumed run
    whose config differs from the checkpoint's is refused (see :mod:`.resume_check`); ``allow_changes``
    sets changed optimizer and schedule settings on the restored optimizer instead."""
    if allow_changes and not resume:
        raise RunDirError(
            f"{resume_check.FLAG} goes with --resume (it says which changes a resumed run may apply)"
        )
    if overwrite and not resume:  # a path check, before any input is read
        refuse_removing_inputs(Path(task.run.out_dir), task.input_paths())
    task.check_inputs()  # before the process group, the lock or the engine
    rank, world = init_distributed()
    out = Path(task.run.out_dir)
    lock = RunLock(out)
    try:
        _agree(lock.acquire, rank)
        _agree(lambda: prepare(out, resume=resume, overwrite=overwrite, inputs=task.input_paths()), rank)
        return _train(task, rank, world, out, resume, allow_changes)
    except BaseException:
        # a refused or failed run leaves the process group now: gloo's threads torn down at interpreter
        # exit were seen to abort the process (SIGABRT) instead of letting it exit with its error code
        leave_process_group()
        raise
    finally:
        lock.release()


def _resume_point(ckpt_dir: Path, resume: str | None) -> str | None:
    if not resume:
        return None
    tag = checkpoints.find_intact(ckpt_dir)
    if tag is None and resume != "auto":
        raise RunDirError(
            f"--resume: no committed checkpoint in {ckpt_dir} (use --resume auto to start fresh when there "
            "is none)"
        )
    return tag


def _check_resumed_config(task: Task, out: Path, folder: Path, allow_changes: bool, rank: int) -> list[str]:
    """Refuse (on every rank) a config that differs from the checkpoint's where it may not; the changed keys
    to set on the restored optimizer (with ``allow_changes``)."""
    applied: list[str] = []

    def check() -> None:
        found = resume_check.saved_config(folder, out)
        if found is None:
            log.warning("%s records no config (nor does %s/config.json): not compared", folder, out)
            return
        applied.extend(
            resume_check.check_resume_config(
                found[0],
                task.config_dict(),
                source=found[1],
                free=task.resume_free_keys,
                allow_changes=allow_changes,
            )
        )

    _agree(check, rank)
    return checkpoints._from_rank0(applied)


def _train(
    task: Task, rank: int, world: int, out: Path, resume: str | None, allow_changes: bool = False
) -> dict[str, Any]:
    run = task.run
    torch.manual_seed(run.seed)
    ckpt_dir = out / "checkpoints"
    tag = _resume_point(ckpt_dir, resume)
    applied = _check_resumed_config(task, out, ckpt_dir / tag, allow_changes, rank) if tag else []
    engine, zero = build_task_engine(task, rank, world)
    if rank == 0:  # once the model is built: a refused model or option leaves no empty checkpoints/ behind
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    # the new config's optimizer settings, taken before the checkpoint restores the old ones
    fresh = resume_check.optimizer_settings(engine) if applied else None
    step, data_state = checkpoints.load(engine.engine, ckpt_dir, tag) if tag else (0, None)
    if tag:
        resume_check.restore_schedule(engine, fresh)
        if rank == 0 and applied:
            log.warning("resumed at step %d with the new %s", step, ", ".join(applied))
    if rank == 0:  # the config as used: written once the checkpoint it continues has loaded
        (out / "config.json").write_text(json.dumps(task.config_dict(), indent=2, default=list))
    metrics = MetricsLog(out / "metrics.jsonl", rank == 0)
    metrics.truncate(step)
    metrics.write({"step": step, **engine.record()})
    if rank == 0:
        print(engine.describe(), flush=True)
    ranks_diverge()  # each rank reads its own shards from here: its errors may be its own
    loader = task.build_loader(rank, world, data_state)
    step, last = _loop(task, engine, zero, loader, metrics, step, ckpt_dir)
    final = ckpt_dir / checkpoints.tag_for(step)
    if tag != final.name:  # a resumed run that had already finished holds its final checkpoint
        final = checkpoints.save(
            engine.engine, ckpt_dir, step, loader.state_dict(), run.keep_checkpoints, task.config_dict()
        )
    result = {**last, "skip_counts": sum_over_ranks(loader.skip_counts)}  # every rank's skips
    result.update(task.evaluate(engine.engine.module, zero))
    where = task.export(engine.engine.module, ExportContext(out, final, zero))
    if rank == 0:
        if where is not None:
            result["export"] = where
        metrics.write({"step": step, "final": True, **result})
        plot_loss(out / "metrics.jsonl", out / "loss.png", task.loss_label)
    barrier()
    return result


def _loop(task: Task, engine: Engine, zero: Zero, loader, metrics: MetricsLog, step: int, ckpt_dir: Path):
    """Steps until ``run.steps``; returns (step, last logged record)."""
    run, rank = task.run, zero.rank
    module = engine.engine.module
    bar = tqdm(
        total=run.steps,
        initial=step,
        disable=rank != 0,
        unit="step",
        desc=task.name,
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    per_step = task.micro_batch_size * zero.world * task.optim.grad_accum
    last: dict[str, Any] = {}
    batches = iter(loader)
    window = (step, time.perf_counter())  # (step, time) where the throughput window starts
    bad = 0
    while step < run.steps:
        lr = engine.scheduler.get_last_lr()[0]  # the rate this step uses
        result = train_step(engine, batches, task.loss, task.loss_items)
        step += 1
        loss = mean_over_ranks(result.loss)  # every step, so that all ranks agree on a bad one
        bad = bad + 1 if result.skipped or not math.isfinite(loss) else 0
        if bad:
            _bad_step(step, loss, result.skipped, bad, run.max_bad_steps, ckpt_dir, rank)
        if step % run.log_every == 0 or step == run.steps:
            rate = per_step * (step - window[0]) / (time.perf_counter() - window[1])
            last = {
                "step": step,
                "loss": loss,
                **task.step_metrics(module, zero),
                "lr": lr,
                f"{task.sample_unit}_per_s": rate,
                **_data_counts(loader),
            }
            metrics.write(last)
            quiet = ("step", "loss", "lr", "skipped", "truncated_captions")
            extra = {k: f"{v:.2f}" for k, v in last.items() if k not in quiet}
            bar.set_postfix(loss=f"{loss:.4f}", **extra)
            window = (step, time.perf_counter())
        bar.update(1)
        if run.eval_every and step % run.eval_every == 0 and step != run.steps:
            metrics.write({"step": step, **task.evaluate(module, zero)})
            window = (step, time.perf_counter())  # evaluation time is not training throughput
        if run.save_every and step % run.save_every == 0 and step != run.steps:
            if bad:
                if rank == 0:
                    log.warning("step %d: not saving a checkpoint after a bad step", step)
            else:
                checkpoints.save(
                    engine.engine,
                    ckpt_dir,
                    step,
                    loader.state_dict(),
                    run.keep_checkpoints,
                    task.config_dict(),
                )
            window = (step, time.perf_counter())
    bar.close()
    if bad:
        raise TrainingDiverged(
            f"the run ended at step {step} after {bad} bad step(s) in a row: nothing saved or exported; "
            f"{_last_good(ckpt_dir)}"
        )
    return step, last


def _last_good(ckpt_dir: Path) -> str:
    marker = ckpt_dir / checkpoints.COMMITTED
    if marker.exists():
        return f"the last good checkpoint is {ckpt_dir / marker.read_text().strip()}"
    return "no checkpoint was committed"


def _bad_step(step: int, loss: float, skipped: bool, bad: int, limit: int, ckpt_dir: Path, rank: int) -> None:
    what = f"loss {loss}" + (", optimizer step skipped (non-finite gradients)" if skipped else "")
    if bad >= limit:
        raise TrainingDiverged(
            f"step {step}: {bad} bad steps in a row ({what}; run.max_bad_steps={limit}): stopped without "
            f"saving or exporting; {_last_good(ckpt_dir)}"
        )
    if rank == 0:
        log.warning("step %d: %s (%d of run.max_bad_steps=%d in a row)", step, what, bad, limit)
