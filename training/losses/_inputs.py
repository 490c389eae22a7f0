"""Checks on the arguments of the pair losses, with errors that name the problem."""

from __future__ import annotations

import torch


def check_pair_inputs(
    name: str,
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    chunk_size: int | str | None,
) -> None:
    """Raise a ValueError naming the first argument of `name` that is not as the loss needs it."""
    for arg, t in (("img_emb", img_emb), ("txt_emb", txt_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a (batch, dim) tensor, got {got}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be floating point, got {t.dtype}")
    if img_emb.shape != txt_emb.shape:
        raise ValueError(
            f"{name}: img_emb and txt_emb must have the same (batch, dim) shape, "
            f"got {tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    if img_emb.dtype != txt_emb.dtype or img_emb.device != txt_emb.device:
        raise ValueError(
            f"{name}: img_emb and txt_emb must share dtype and device, got {img_emb.dtype} on "
            f"{img_emb.device} "
            f"and {txt_emb.dtype} on {txt_emb.device}"
        )
    if img_emb.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    for arg, t in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if t is None and arg == "logit_bias":
            continue
        if not isinstance(t, torch.Tensor) or t.numel() != 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} must be a one-element tensor shaped (1,), got {got}")
    if (
        chunk_size is not None
        and chunk_size != "auto"
        and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1)
    ):
        raise ValueError(f"{name}: chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
