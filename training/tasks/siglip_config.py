"""The typed run config of SigLIP pretraining, loaded from YAML with ``key=value`` overrides.

One dataclass per component (model, data, loss) plus the sections every task shares
(``optim``, ``run``: :mod:`training.runner.config`), composed into :class:`PretrainConfig`.
An unknown key, a value of the wrong type or out of range is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from vision_tower import SiglipConfig, get_preset

from ..losses import LOSSES
from ..runner.config import ROOT, OptimSection, RunSection, check_range, load_sections, resolve_path

__all__ = [
    "ROOT",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "PretrainConfig",
    "RunSection",
    "load_config",
    "resolve_path",
]


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
        check_range("data.batch_size", self.batch_size, lo=1)
        check_range("data.num_workers", self.num_workers, lo=0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, lo=0)
        check_range("data.image_size", self.image_size, lo=1)


@dataclass
class LossSection:
    """``sigmoid`` (SigLIP) or ``softmax`` (CLIP InfoNCE, the paper's ablation); ``chunk_size`` tiles
    the pair matrix (None: plain). t' and b start from the model (ln 10, -10 from scratch)."""

    kind: str = "sigmoid"
    chunk_size: int | None = 1024
    logit_scale_max: float | None = math.log(100.0)

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind must be one of {', '.join(sorted(LOSSES))}; got {self.kind!r}")
        check_range("loss.chunk_size", self.chunk_size, lo=1)
        check_range("loss.logit_scale_max", self.logit_scale_max, lo=0, lo_open=True)


@dataclass
class PretrainConfig:
    """The ``vision-tower pretrain`` config: what the SigLIP task reads plus the runner's sections."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> PretrainConfig:
    """Read a YAML run config (``configs/pretrain/...`` also from the repository root or the installed
    package), apply overrides, validate every key and value."""
    return load_sections(PretrainConfig, None if path is None else resolve_path(str(path)), overrides)
