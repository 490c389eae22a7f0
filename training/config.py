"""Typed run configs for pretraining, loaded from YAML with ``key=value`` overrides.

One dataclass per component (model, data, optimiser, loss, run), composed into
:class:`PretrainConfig`. An unknown key anywhere is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision_tower import SiglipConfig, get_preset

from .resources import shipped_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ModelSection:
    """What to train: a preset from scratch, or any checkpoint ``SiglipModel.from_pretrained`` reads.

    ``lock_image`` / ``lock_text`` freeze a tower (LiT / SigLiT: lock the image tower of a
    pretrained checkpoint and train the text tower). ``vision`` / ``text`` override preset fields.
    """

    preset: str | None = None
    init_from: str | None = None
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    lock_image: bool = False
    lock_text: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.init_from is None):
            raise ValueError(
                "model: set exactly one of 'preset' (from scratch) or 'init_from' (a checkpoint)"
            )
        if self.lock_image and self.lock_text:
            raise ValueError("model: lock_image and lock_text together leave nothing to train")
        if self.preset is not None:
            self.model_config()  # an unknown preset or override key fails here, not after set-up
        elif self.vision or self.text:
            raise ValueError("model.vision/model.text override presets; they do not apply to init_from")

    def model_config(self) -> SiglipConfig:
        """The preset's config with the ``vision`` / ``text`` overrides applied (strictly)."""
        base = get_preset(self.preset)
        return SiglipConfig.from_dict(
            {
                **base.to_dict(),
                "vision": {**base.vision.to_dict(), **self.vision},
                "text": {**base.text.to_dict(), **self.text},
            }
        )


@dataclass
class DataSection:
    """WebDataset shards and preprocessing. ``batch_size`` is per rank and per micro-step."""

    train_shards: str = ""
    val_shards: str | None = None
    zeroshot_dir: str | None = None
    tokenizer: str | None = None
    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 1000
    image_size: int | None = None

    def __post_init__(self) -> None:
        if not self.train_shards:
            raise ValueError("data.train_shards is required (a brace pattern, folder or list of .tar shards)")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class OptimSection:
    """AdamW with decoupled weight decay, linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, e.g. [0.9, 0.95], got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        if self.lr <= 0 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"optim: need lr > 0, grad_accum >= 1, warmup_steps >= 0 (got {self.lr}, "
                f"{self.grad_accum}, {self.warmup_steps})"
            )


@dataclass
class LossSection:
    """``sigmoid`` (SigLIP) or ``softmax`` (CLIP InfoNCE, the paper's ablation); ``chunk_size`` tiles
    the pair matrix (None: plain). t' and b start from the model (ln 10, -10 from scratch)."""

    kind: str = "sigmoid"
    chunk_size: int | None = 1024
    logit_scale_max: float | None = math.log(100.0)

    def __post_init__(self) -> None:
        if self.kind not in ("sigmoid", "softmax"):
            raise ValueError(f"loss.kind must be 'sigmoid' or 'softmax', got {self.kind!r}")


@dataclass
class RunSection:
    """Length, checkpoints, evaluation and the DeepSpeed config of a run."""

    out_dir: str = "runs/pretrain"
    steps: int = 1000
    seed: int = 0
    deepspeed: str = "configs/deepspeed/zero2.json"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(
                f"run: need steps, log_every, keep_checkpoints >= 1 (got {self.steps}, "
                f"{self.log_every}, {self.keep_checkpoints})"
            )
        if self.save_every < 0 or self.eval_every < 0:
            raise ValueError("run: save_every and eval_every must be >= 0 (0 turns them off)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"run.precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from a dict, recursively and strictly."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = _coerce(value, sub, f"{where}.{name}".lstrip("."))
    try:
        return cls(**kwargs)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where or 'config'}: {err}") from err


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Numbers for numeric fields: YAML reads ``1e-3`` (no dot) as a string, and ``1`` as an int."""
    if typing.get_origin(hint) not in (None, typing.Union, types.UnionType):
        return value  # containers (betas: tuple[float, float]) are taken as written
    allowed = typing.get_args(hint) or (hint,)
    if value is None or isinstance(value, bool) or not ({float, int} & set(allowed)):
        return value
    try:
        return int(value) if int in allowed and float not in allowed else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` strings (values parsed as YAML) applied to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> PretrainConfig:
    """Read a YAML run config, apply overrides, validate every key and value."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    return _build(PretrainConfig, apply_overrides(data, list(overrides)), "")


def resolve_path(path: str) -> str:
    """Config paths are relative to the working directory, else to the repository root; ``configs/...``
    also names the configs shipped in the package (an installed wheel has no repository root)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    if (ROOT / p).exists():
        return str(ROOT / p)
    return str(shipped_config(p) or p)
