"""The task-agnostic training runner: a :class:`Task` says what is specific (model, batches, loss,
evaluation, export); :func:`train` does the rest (engine, schedule, cadence, checkpoints, resume,
metrics). :func:`train_step` is the one step that training, tests and benchmarks run.

Importing this package does not import DeepSpeed."""

from .checkpoints import CheckpointDamaged
from .config import OptimSection, RunSection, load_sections
from .engine import Engine, build_engine, deepspeed_config, init_distributed, param_groups
from .loop import StepResult, TrainingDiverged, build_task_engine, train, train_step
from .metrics import mean_over_ranks
from .run_dir import RunDirError
from .task import ExportContext, Loader, Task
from .zero import Zero

__all__ = [
    "CheckpointDamaged",
    "Engine",
    "ExportContext",
    "Loader",
    "OptimSection",
    "RunDirError",
    "RunSection",
    "StepResult",
    "Task",
    "TrainingDiverged",
    "Zero",
    "build_engine",
    "build_task_engine",
    "deepspeed_config",
    "init_distributed",
    "load_sections",
    "mean_over_ranks",
    "param_groups",
    "train",
    "train_step",
]
