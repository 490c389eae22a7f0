"""SigLIP vision towers: load, run, extract patch features and save in the Hugging Face layout."""

from .checkpoint import CheckpointError
from .config import NaFlexVisionConfig, SiglipConfig, TextConfig, VisionConfig
from .images import ImageLoadError, load_image
from .naflex import NaFlexOutput, NaFlexVisionTower
from .naflex_processor import NaFlexBatch, NaFlexImageProcessor
from .presets import get_preset, list_presets, register_preset
from .processor import ImageProcessor
from .siglip import SiglipModel, SiglipOutput
from .text import TextOutput, TextTower
from .tokenizer import Tokenizer
from .vision import TowerOutput, VisionTower, interpolate_pos_embed

__all__ = [
    "CheckpointError",
    "ImageLoadError",
    "ImageProcessor",
    "NaFlexBatch",
    "NaFlexImageProcessor",
    "NaFlexOutput",
    "NaFlexVisionConfig",
    "NaFlexVisionTower",
    "SiglipConfig",
    "SiglipModel",
    "SiglipOutput",
    "TextConfig",
    "TextOutput",
    "TextTower",
    "Tokenizer",
    "TowerOutput",
    "VisionConfig",
    "VisionTower",
    "get_preset",
    "interpolate_pos_embed",
    "load_image",
    "list_presets",
    "register_preset",
]
