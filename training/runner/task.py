"""What a training task tells the runner. The runner owns the process group, the engine, the schedule,
accumulation, precision, cadence, checkpoints, resume, the out_dir, metrics and the loss plot; a task
owns its model, its batches, its step's loss, its extra metrics, its evaluation and its export."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .config import OptimSection, RunSection
from .engine import param_groups
from .writes import atomic_folder
from .zero import Zero


class Loader(Protocol):
    """A resumable stream of batches (``training.data.ShardLoader`` is one)."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    @property
    def skip_counts(self) -> dict[str, int]: ...

    @property
    def skipped(self) -> int: ...

    @property
    def samples_seen(self) -> int: ...

    @property
    def truncated_captions(self) -> int: ...


@dataclass
class ExportContext:
    """Where and from what a task exports at the end of a run."""

    out_dir: Path  # run.out_dir; exports go below it
    checkpoint: Path | None  # the final committed checkpoint folder
    zero: Zero

    def folder(self, name: str, needed: int | None = None) -> contextlib.AbstractContextManager[Path]:
        """``with ctx.folder("native") as tmp:`` write the export into ``tmp``; once the block ends it is
        renamed to ``out_dir/export/<name>`` (replacing an earlier one), its files given the user's umask.
        If writing fails (a full disk), the partial folder is removed, any earlier export is kept, and a
        one-line :class:`~training.runner.writes.SaveFailed` names the folder, the room left and
        ``needed`` (bytes, an estimate)."""
        return atomic_folder(Path(self.out_dir) / "export" / name, f"export {name}", needed)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The consolidated weights (fp32 master copies where ZeRO keeps them), on rank 0; None elsewhere.
        Call on every rank."""
        return self.zero.consolidated_state_dict(model, self.checkpoint)


class Task(abc.ABC):
    """One kind of training run. Subclasses set ``optim``, ``run`` and ``micro_batch_size`` from their config.

    Every method runs on every rank; under ZeRO-3 those that read parameters gather them through
    ``zero`` (collectives), so they must not branch on the rank before gathering.
    """

    name: str = "train"  # progress-bar label
    sample_unit: str = "samples"  # throughput is logged as "<unit>_per_s"
    loss_label: str = "loss"  # y axis of loss.png
    optim: OptimSection
    run: RunSection
    micro_batch_size: int  # per rank and micro-step
    # config keys (dotted, or a section's prefix) that only steer evaluation or export: they may change when
    # the run is resumed. The runner's own: run length and cadence (``resume_check.FREE_KEYS``)
    resume_free_keys: tuple[str, ...] = ()

    def check_inputs(self) -> None:
        """Check what the run will read (data files, shards) before any set-up, raising a ``ValueError`` or
        ``OSError`` that names the config key. By default nothing."""
        return None

    def input_paths(self) -> list[tuple[str, str]]:
        """(config key, local path) of every file or folder the run reads (checkpoints, tokenizers, shards,
        caches), so that ``--overwrite`` refuses to remove one of them. By default none."""
        return []

    def config_dict(self) -> dict[str, Any]:
        """The whole config, written to ``out_dir/config.json``."""
        return {"optim": vars(self.optim), "run": vars(self.run)}

    @abc.abstractmethod
    def build_model(self, zero: Zero) -> nn.Module:
        """The model, with frozen parts already ``requires_grad_(False)``. At stage 3 build it so no rank
        holds it whole: ``zero.partition(part)`` part by part, or inside ``zero.init_context()``."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups of trainable parameters (frozen ones get no optimizer state). By default
        decayed and not decayed, as the modules' ``no_weight_decay()`` say."""
        return param_groups(model, self.optim.weight_decay)

    @abc.abstractmethod
    def build_loader(self, rank: int, world: int, resume_state: dict[str, Any] | None) -> Loader:
        """This rank's training batches, continuing from ``resume_state`` (a saved ``state_dict()``)."""

    @abc.abstractmethod
    def loss(self, engine: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """This rank's loss of one micro-batch (already on the device, floats in the engine's dtype).
        A task with ``loss_items`` also takes ``num_items_in_batch``: its sum of terms is divided by it."""

    # For a loss that is a mean over a number of terms that varies between batches (answer tokens): a
    # method ``(batch) -> int`` counting them, so that the runner weighs micro-batches and ranks by their
    # share of the global batch (see ``train_step``). None: each micro-batch's loss weighs the same.
    loss_items: Callable[[dict[str, Any]], int] | None = None

    def step_metrics(self, model: nn.Module, zero: Zero) -> dict[str, float]:
        """Extra values logged with the loss (e.g. the temperature)."""
        return {}

    def evaluate(self, model: nn.Module, zero: Zero) -> dict[str, float]:
        """Held-out metrics, every ``run.eval_every`` steps and at the end."""
        return {}

    @abc.abstractmethod
    def export(self, model: nn.Module, ctx: ExportContext) -> str | None:
        """Write the trained model for users (e.g. transformers folders); returns where, on rank 0."""
