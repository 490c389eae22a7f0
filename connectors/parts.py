"""What a vision-language model is made of, as its checkpoint formats read and write it: the parts that
``VisionLanguageModel.from_pretrained`` assembles and ``save_pretrained`` hands to a format's writer,
and the ``model_type`` of the native layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from vision_tower import ImageProcessor, VisionTower

from .base import Connector, Grid
from .layouts import LayoutConfig

# config.json ``model_type`` of the native layout (connectors.formats.native)
NATIVE_MODEL_TYPE = "vision_tower_vlm"


def tower_grid(tower: VisionTower) -> Grid:
    """The tower's token grid at its configured image size."""
    side = tower.config.image_size // tower.config.patch_size
    return (side, side)


@dataclass
class VLMParts:
    """A VLM's tower, connector, decoder, tokenizer and processor (each None when absent) and the two
    settings that join them: the placeholder ``image_token_id`` and the ``attention`` (prefix, causal or
    image_bidirectional);
    ``tower_swap``: the record of the tower swap that made it, if one did (:mod:`connectors.swap`);
    ``layout``: the image layout (name and options) and ``layout_params`` its learned tensors as a
    checkpoint holds them (``image_newline``; when saving they are in the state dict, ``layout_params.*``);
    ``chat_template``: the Jinja text conversations are rendered with in training (saved as the tokenizer's
    template, and as the processor's in the formats whose processor applies it), or None.
    A :class:`~connectors.VisionLanguageModel` has the same attributes."""

    tower: VisionTower
    connector: Connector
    decoder: PreTrainedModel
    image_token_id: int
    attention: str
    tokenizer: Any | None = None
    processor: ImageProcessor | None = None
    tower_swap: dict[str, Any] | None = None
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    layout_params: dict[str, torch.Tensor] = field(default_factory=dict)  # as read from a checkpoint
    chat_template: str | None = None

    @property
    def num_image_tokens(self) -> int:
        """Placeholders one image takes in the prompt (at the tower's configured image size)."""
        return self.connector.num_tokens(tower_grid(self.tower))
