"""transformers' ``LlavaNextForConditionalGeneration`` (format ``llava_next``, image layout ``anyres``) and
``LlavaOnevisionForConditionalGeneration`` (``llava_onevision``, layout ``anyres_max``) layouts: LLaVA's
(:mod:`.llava`: the same decoders, projector, tower layer and causal attention) with tiled images.

config.json               model_type "llava_next" / "llava_onevision": vision_config (SigLIP), text_config,
                          image_token_index, projector_hidden_act, multimodal_projector_bias,
                          vision_feature_layer, vision_feature_select_strategy "full", image_grid_pinpoints;
                          OneVision: vision_aspect_ratio "anyres_max_<max_tiles>"
model.safetensors         (or an index and shards) vision_tower.*, multi_modal_projector.linear_{1,2}.*,
                          language_model.*, and the layout's image_newline at the top level
tokenizer files, preprocessor_config.json   when the VLM has them; the image processor is
                          LlavaNextImageProcessor / LlavaOnevisionImageProcessor with the tower processor's
                          size, statistics and filter, crop_size the tile, do_center_crop false,
                          image_grid_pinpoints
processor_config.json     with both: LlavaNextProcessor (patch_size, num_additional_image_tokens 0) /
                          LlavaOnevisionProcessor (num_image_tokens of a crop, vision_aspect_ratio), each with
                          vision_feature_select_strategy "full" and the image token
tower_swap.json           when a tower swap made the VLM

One image per prompt: LLaVA-OneVision's classes give each image of a prompt holding several only its base
crop and a newline (``batch_num_images``), which the ``anyres_max`` layout does not.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from vision_tower import CheckpointError

from ..layouts import CropShape, ImageLayout, LayoutConfig
from ..parts import VLMParts, tower_grid
from . import llava
from .common import FormatError, check_plain_decoder, formats_for_layout, read_multimodal

NEWLINE = "image_newline"
# the newline tensor's names in a checkpoint: as transformers 4.x saves it, and 5.x's in-memory name
_NEWLINE_KEYS = (NEWLINE, f"model.{NEWLINE}")
_ASPECT_RATIO = re.compile(r"anyres_max_([1-9][0-9]*)")


class TiledLlava(ABC):
    """One of the two formats: what LLaVA writes and reads, plus the image layout ``layout`` (a registered
    name) in transformers' ``model_type`` ``name`` (also the format's name)."""

    name = ""
    title = ""  # the family, as the messages name it
    layout = ""
    architecture = ""
    processor_class = ""
    image_processor = ""

    def check(self, vlm: VLMParts) -> None:
        """Refuse what the format cannot express, saying which format can hold it (``vlm``: the parts, or
        the VisionLanguageModel, which has the same attributes)."""
        check_plain_decoder(vlm.decoder, self.name)
        found = vlm.layout.name
        if found != self.layout:
            raise FormatError(
                f"{self.title} tiles images with the {self.layout!r} image layout; this VLM's is {found!r}: "
                f"save {formats_for_layout(found)}"
            )
        llava.check_projection(vlm, self.title)

    def save(self, parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
        self.check(parts)
        layout = _built(parts)
        pins = [list(p) for p in layout.pinpoints]
        tile = parts.tower.config.image_size
        llava.write(
            parts,
            out,
            state_dict,
            architecture=self.architecture,
            model_type=self.name,
            fields={"image_grid_pinpoints": pins, **self.fields(layout)},
            processor_config={
                "processor_class": self.processor_class,
                **self.processor_config(parts, layout),
            },
            processor_fields={
                "image_processor_type": self.image_processor,
                "crop_size": {"height": tile, "width": tile},  # LLaVA-NeXT's processor cuts tiles this size
                "do_center_crop": False,
                "image_grid_pinpoints": pins,
            },
        )

    def fields(self, layout: ImageLayout) -> dict[str, Any]:
        """config.json keys of this format alone."""
        return {}

    @abstractmethod
    def processor_config(self, parts: VLMParts, layout: ImageLayout) -> dict[str, Any]:
        """The arguments of this format's multimodal processor (besides strategy and image token)."""

    def options(self, hf: Any, source: str) -> dict[str, Any]:
        """The image layout's options from the checkpoint's transformers config."""
        return {"grid_pinpoints": [list(p) for p in hf.image_grid_pinpoints]}

    def load(self, path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
        hf, sd = read_multimodal(path, _NEWLINE_KEYS)
        found = [k for k in _NEWLINE_KEYS if k in sd]
        if len(found) != 1:
            raise CheckpointError(
                f"{path}: a {self.title} checkpoint holds one {NEWLINE} tensor (named "
                f"{' or '.join(_NEWLINE_KEYS)}); found {found or 'none'}"
            )
        parts = llava.read(path, hf, sd, dtype=dtype, device=device, extra=_NEWLINE_KEYS)
        parts.layout = LayoutConfig(self.layout, self.options(hf, str(path)))
        parts.layout_params = {NEWLINE: sd[found[0]]}
        return parts


class LlavaNext(TiledLlava):
    name = "llava_next"
    title = "LLaVA-NeXT"
    layout = "anyres"
    architecture = "LlavaNextForConditionalGeneration"
    processor_class = "LlavaNextProcessor"
    image_processor = "LlavaNextImageProcessor"

    def processor_config(self, parts: VLMParts, layout: ImageLayout) -> dict[str, Any]:
        # a crop's token grid side is the tile over patch_size (linear / mlp2x connectors keep the grid)
        return {"patch_size": parts.tower.config.patch_size, "num_additional_image_tokens": 0}


class LlavaOnevision(TiledLlava):
    name = "llava_onevision"
    title = "LLaVA-OneVision"
    layout = "anyres_max"
    architecture = "LlavaOnevisionForConditionalGeneration"
    processor_class = "LlavaOnevisionProcessor"
    image_processor = "LlavaOnevisionImageProcessor"

    def fields(self, layout: ImageLayout) -> dict[str, Any]:
        # transformers reads max_tiles back from this name (int(ratio.strip("anyres_max_"))): any count holds
        return {"vision_aspect_ratio": f"anyres_max_{layout.max_tiles}"}

    def processor_config(self, parts: VLMParts, layout: ImageLayout) -> dict[str, Any]:
        return {"num_image_tokens": layout.crop.tokens, **self.fields(layout)}

    def options(self, hf: Any, source: str) -> dict[str, Any]:
        ratio = hf.vision_aspect_ratio
        match = _ASPECT_RATIO.fullmatch(str(ratio))
        if match is None:
            raise CheckpointError(
                f"{source}: vision_aspect_ratio {ratio!r} is not 'anyres_max_<tiles>' (LLaVA-OneVision's "
                "image layout)"
            )
        return {**super().options(hf, source), "max_tiles": int(match.group(1))}


def _built(parts: VLMParts) -> ImageLayout:
    """The VLM's image layout built for its tower and connector (the pinpoints it uses when none were
    given)."""
    size = parts.tower.config.image_size
    return parts.layout.build(CropShape.of(parts.connector, (size, size), tower_grid(parts.tower)))


LLAVA_NEXT = LlavaNext()
LLAVA_ONEVISION = LlavaOnevision()
