"""What the evaluations share: the model's device, an eval-mode context that restores every submodule's
training flag, and the sigmoid pair score of two-tower SigLIP models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def model_device(model: Any, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else where the two-tower model's ``logit_scale`` lives."""
    return torch.device(device) if device is not None else torch.as_tensor(model.logit_scale).device


@contextlib.contextmanager
def eval_mode(model: Any, *, inference: bool = False) -> Iterator[None]:
    """``model.eval()`` inside (and no autograd at all with ``inference``: ``torch.inference_mode``);
    every submodule's training flag is restored after (a tower locked in eval mode stays so)."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    flags = [m.training for m in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode() if inference else contextlib.nullcontext():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def chw(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) from an image transform that may return (1, 3, H, W)."""
    return x[0] if x.dim() == 4 and x.shape[0] == 1 else x


def sigmoid_scores(model: Any, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """sigmoid(t * img @ txt.T + b): (N, D), (C, D) -> (N, C)."""
    t = model.logit_scale.exp().to(img_emb)
    return torch.sigmoid(img_emb @ txt_emb.T * t + model.logit_bias.to(img_emb))  # (N, C)
