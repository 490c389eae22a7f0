"""Reading the image tower and the projector out of a PaliGemma or LLaVA checkpoint's tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vision_tower import CheckpointError, VisionConfig, VisionTower
from vision_tower.formats.keys import part


def vision_config_fields(hf_config: Any, source: str) -> dict[str, Any]:
    """The SigLIP fields of a transformers vision config (defaults already filled in by transformers)."""
    if hf_config.model_type != "siglip_vision_model":
        raise CheckpointError(
            f"{source}: the image tower is {hf_config.model_type!r}; only SigLIP towers "
            f"(siglip_vision_model) are supported"
        )
    fields = [f.name for f in dataclasses.fields(VisionConfig) if f.name != "use_head"]
    out = {name: getattr(hf_config, name) for name in fields if hasattr(hf_config, name)}
    out["vision_use_head"] = bool(getattr(hf_config, "vision_use_head", False))
    out["model_type"] = "siglip_vision_model"
    return out


def tower_from_tensors(
    sd: dict[str, torch.Tensor],
    hf_vision_config: Any,
    *,
    source: str,
    feature_layer: int,
    dtype: torch.dtype | None = None,
) -> VisionTower:
    """The tower (no pooling head, in ``dtype``) from a checkpoint's tensors under ``vision_tower.``."""
    config = vision_config_fields(hf_vision_config, source)
    tower_sd = {k: v for k, v in sd.items() if k.startswith(("vision_tower.", "model.vision_tower."))}
    return VisionTower.from_state_dict(
        tower_sd, config, source=source, feature_layer=feature_layer, use_head=False, dtype=dtype, copy=False
    )


def projector_tensors(sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The ``multi_modal_projector`` tensors, prefix removed (saved or 5.x in-memory layout)."""
    proj = part(sd, "multi_modal_projector.") or part(sd, "model.multi_modal_projector.")
    if not proj:
        raise CheckpointError(f"{source} holds no multi_modal_projector.* tensors")
    return proj


def expect_keys(proj: dict[str, torch.Tensor], expected: set[str], source: str) -> None:
    if set(proj) != expected:
        raise CheckpointError(
            f"{source}: projector tensors {sorted(proj)} are not the expected {sorted(expected)}"
        )
