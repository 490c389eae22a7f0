"""Image layouts: how one image becomes crops (pixels, on the data-loader workers) and decoder tokens (on
the model), one registered module per scheme.

``build_layout(name, CropShape(size, tokens, grid), **options)`` builds one of ``list_layouts()``:
``fixed`` (one squashed crop), ``anyres`` (LLaVA-NeXT), ``anyres_max`` / ``anyres_max_9``
(LLaVA-OneVision), ``split`` (Idefics3 / SmolVLM image splitting) and ``pan_and_scan`` (Gemma 3).
"""

from . import anyres, fixed, pan_and_scan, split  # noqa: F401  (register the layouts)
from .base import Crop, CropShape, ImageLayout, ImagePlan, Step, TokenCountError
from .registry import LayoutConfig, LayoutOptionError, build_layout, list_layouts, register_layout

__all__ = [
    "Crop",
    "CropShape",
    "ImageLayout",
    "ImagePlan",
    "LayoutConfig",
    "LayoutOptionError",
    "Step",
    "TokenCountError",
    "build_layout",
    "list_layouts",
    "register_layout",
]
