"""Connectors (projectors) from a vision tower to a language decoder, and the assembled vision-language model.

``build_connector(name, in_dim, out_dim, **options)`` builds one of the registered connectors
(``list_connectors()``); ``VisionLanguageModel`` puts a tower, a connector and a transformers causal LM
together and moves it in and out of the native, PaliGemma and LLaVA checkpoint layouts. Image layouts
(``build_layout``, ``list_layouts()``: ``fixed``, ``anyres``, ``anyres_max``) say how one image becomes crops
and decoder tokens.
"""

from . import mlp, pixel_shuffle, pooling, resampler  # noqa: F401  (register the connectors)
from .base import Connector
from .formats import FormatError
from .layouts import CropShape, ImageLayout, LayoutConfig, build_layout, list_layouts, register_layout
from .registry import ConnectorConfig, build_connector, list_connectors, register_connector
from .vlm import VisionLanguageModel, VLMOutput

__all__ = [
    "Connector",
    "ConnectorConfig",
    "CropShape",
    "FormatError",
    "ImageLayout",
    "LayoutConfig",
    "VLMOutput",
    "VisionLanguageModel",
    "build_connector",
    "build_layout",
    "list_connectors",
    "list_layouts",
    "register_connector",
    "register_layout",
]
