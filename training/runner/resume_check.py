"""What may change when a run is resumed. The resolved config of the new command is compared, key by key,
with the one the checkpoint was trained with (``run_config.json`` inside the checkpoint; ``out_dir/
config.json`` for a checkpoint written before checkpoints held their config):

- **free**: how long the run goes (``run.steps``: the cosine schedule is stretched to the new length),
  logging, evaluation and checkpoint cadence, the failure policy, compilation and gradient checkpointing,
  and what a task lists as evaluation or export only (``Task.resume_free_keys``);
- **applied with ``--resume-with-changes``**: the optimizer's and the schedule's settings (learning rate,
  weight decay, betas, eps, warm-up, floor, clipping), set on the restored optimizer and evaluated at the
  resumed step;
- **fixed**: everything else (model, training data, loss, stage, accumulation, precision, ZeRO config,
  seed): the checkpoint's weights, optimizer state and data position were made with them, so a change is
  refused even with the flag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoints import CONFIG_RECORD as RECORD
from .engine import Engine

FLAG = "--resume-with-changes"
FREE_KEYS = (
    "run.steps",
    "run.log_every",
    "run.eval_every",
    "run.save_every",
    "run.keep_checkpoints",
    "run.max_bad_steps",
    "run.out_dir",
    "run.compile",
)
APPLIED_KEYS = (
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.grad_clip",
)
_GROUP_SETTINGS = ("initial_lr", "weight_decay", "betas", "eps")  # what AdamW's groups take from the config


class ResumeConfigChanged(ValueError):
    """``--resume`` with a config whose model, data or optimizer settings differ from the checkpoint's."""


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):  # an empty one holds no key
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON holds it (tuples as lists), so a saved and a new one compare equal."""
    return json.loads(json.dumps(config, default=list))


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def saved_config(ckpt_folder: Path, out_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The config the checkpoint in ``ckpt_folder`` was trained with, and the file it came from; None if
    neither the checkpoint nor ``out_dir`` records one."""
    for path in (ckpt_folder / RECORD, out_dir / "config.json"):
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ResumeConfigChanged(
                    f"{path} is not valid JSON ({err}): the config the checkpoint was trained with cannot be "
                    "compared with this one"
                ) from None
            if not isinstance(data, dict):
                raise ResumeConfigChanged(f"{path}: expected a mapping of config sections")
            return data, path
    return None


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` of every dotted key that differs (absent on one side: None)."""
    old, now = _flat(_plain(saved)), _flat(_plain(new))
    return [(k, old.get(k), now.get(k)) for k in sorted({*old, *now}) if old.get(k) != now.get(k)]


def check_resume_config(
    saved: dict[str, Any],
    new: dict[str, Any],
    *,
    source: Path,
    free: tuple[str, ...] = (),
    allow_changes: bool = False,
) -> list[str]:
    """Refuse (:class:`ResumeConfigChanged`, one line listing each ``key: old -> new``) a resumed run whose
    config differs from ``saved`` in a key that is not free; with ``allow_changes`` the applied keys may
    differ (returned, to set on the restored optimizer), the fixed ones never. ``free``: the task's keys
    that may change besides the runner's."""
    free = FREE_KEYS + tuple(free)
    changes = [c for c in config_changes(saved, new) if not _matches(c[0], free)]
    fixed = [k for k, _, _ in changes if not _matches(k, APPLIED_KEYS)]
    settable = [k for k, _, _ in changes if _matches(k, APPLIED_KEYS)]
    if not changes or (allow_changes and not fixed):
        return settable
    listed = "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in changes)
    advice = []
    if fixed:
        advice.append(
            f"{', '.join(fixed)} cannot change on resume (the checkpoint's weights, optimizer state and data "
            "position were made with them): put them back, or start a new run (another run.out_dir, or "
            "--overwrite)"
        )
    if settable and not allow_changes:
        advice.append(f"pass {FLAG} to continue from the checkpoint with the new {', '.join(settable)}")
    elif allow_changes:
        advice.append(f"{FLAG} applies the optimizer's and the schedule's settings only")
    raise ResumeConfigChanged(
        f"--resume: the config differs from the one the checkpoint was trained with ({source}): {listed}. "
        f"{'; '.join(advice)} (run.steps, logging, evaluation and checkpoint cadence may change freely)"
    )


def optimizer_settings(engine: Engine) -> tuple[list[dict[str, Any]], list[float]]:
    """The settings of a freshly built engine's parameter groups and schedule (what the new config gives),
    to set again after a checkpoint restored the old ones."""
    groups = engine.scheduler.optimizer.param_groups
    return [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in groups], list(engine.scheduler.base_lrs)


def restore_schedule(
    engine: Engine, settings: tuple[list[dict[str, Any]], list[float]] | None = None
) -> None:
    """After a checkpoint has loaded: the rate of the next step from this run's schedule at the resumed step
    (the checkpoint holds the rate its own schedule gave, which for a run made longer is the old end's), and
    with ``settings`` (:func:`optimizer_settings` of the new config) first the new group settings and base
    rates. The moments (Adam's state) stay. Unchanged settings give the checkpoint's rate to the bit."""
    scheduler = engine.scheduler
    current = scheduler.optimizer.param_groups  # after loading: the checkpoint's groups
    if settings is not None:
        groups, base_lrs = settings
        if len(current) != len(groups):
            raise ResumeConfigChanged(
                f"the checkpoint's optimizer has {len(current)} parameter groups, this run {len(groups)}"
            )
        scheduler.base_lrs = list(base_lrs)
        for group, fresh in zip(current, groups):
            group.update(fresh)
    for group, base, factor in zip(current, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in current]
