"""SigLIP vision towers: load, run, extract patch features and save in the Hugging Face layout."""

from .checkpoint import CheckpointError
from .config import SiglipConfig, TextConfig, VisionConfig
from .presets import get_preset, list_presets, register_preset
from .siglip import SiglipModel, SiglipOutput
from .text import TextOutput, TextTower
from .vision import TowerOutput, VisionTower, interpolate_pos_embed

__all__ = [
    "CheckpointError",
    "SiglipConfig",
    "SiglipModel",
    "SiglipOutput",
    "TextConfig",
    "TextOutput",
    "TextTower",
    "TowerOutput",
    "VisionConfig",
    "VisionTower",
    "get_preset",
    "interpolate_pos_embed",
    "list_presets",
    "register_preset",
]
