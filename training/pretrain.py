"""``vision-tower pretrain``: SigLIP pretraining, the SigLIP task (:mod:`training.tasks.siglip`) run by
the shared runner (:mod:`training.runner`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import PretrainConfig, load_config
from .runner import train
from .tasks.siglip import SiglipTask, build_model

__all__ = ["build_model", "pretrain", "run_from_cli"]


def pretrain(cfg: PretrainConfig, *, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the final metrics on every rank."""
    return train(SiglipTask(cfg), resume=resume, overwrite=overwrite)


def run_from_cli(
    config_path: str | None, overrides: list[str], resume: str | None, overwrite: bool = False
) -> dict[str, Any]:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    return pretrain(load_config(config_path, overrides), resume=resume, overwrite=overwrite)
