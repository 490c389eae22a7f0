"""transformers' ``Gemma3ForConditionalGeneration`` layout (format ``gemma3``): a ``gemma3_text`` decoder
behind the ``avg_pool`` connector (``Gemma3MultiModalProjector``) on the tower's final post-layernorm output,
with ``image_bidirectional`` attention, image layout ``fixed`` or ``pan_and_scan``.

config.json               model_type "gemma3": vision_config (SigLIP), text_config (gemma3_text),
                          mm_tokens_per_image (tokens_per_side squared), image_token_index,
                          boi_token_index, eoi_token_index (the tokenizer's <start_of_image> /
                          <end_of_image> when it holds them)
model.safetensors         (or an index and shards) vision_tower.*, multi_modal_projector.*:
                          mm_input_projection_weight (in_dim, out_dim: the connector's linear map
                          transposed) and mm_soft_emb_norm.weight; language_model.*
tokenizer files           when the VLM has a tokenizer (its chat template with it)
preprocessor_config.json  Gemma3ImageProcessor (Gemma3ImageProcessorPil for the PIL backend): the tower
                          processor's size, filter and statistics (the VLM's processor, else SigLIP's at the
                          tower's size); do_pan_and_scan true and the pan_and_scan_* options with the
                          ``pan_and_scan`` layout, false with ``fixed``
processor_config.json     with a tokenizer: Gemma3Processor, image_seq_length (tokens per crop)
tower_swap.json           when a tower swap made the VLM

transformers 5.x's Gemma3Processor passes its own pan-and-scan defaults (off, 256, 4, 1.2) over its image
processor's, so ``AutoProcessor`` pans and scans when called with ``do_pan_and_scan=True`` and the saved
``pan_and_scan_*`` values (``processor.image_processor.pan_and_scan_min_crop_size``, ...);
``AutoImageProcessor`` alone applies them as saved, and this reader takes the layout from them.

Gemma 3's projector normalises with the tower's ``layer_norm_eps``, so the connector's ``eps`` must equal it.
Gemma3Processor writes every image as ``\\n\\n<start_of_image>`` placeholders ``<end_of_image>\\n\\n`` (the
``pan_and_scan`` layout's prompt for an image it does not crop); the ``fixed`` layout's prompt is the
placeholders alone, so a ``fixed`` VLM meant to run behind Gemma3Processor holds that text in its prompts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from vision_tower import CheckpointError, ImageProcessor
from vision_tower.checkpoint import read_json_object, strict_load
from vision_tower.processor import read_config as read_processor_config

from ..decoder import family
from ..layouts import CropShape, LayoutConfig
from ..layouts.pan_and_scan import BOI, EOI
from ..parts import VLMParts, tower_grid
from ..pooling import AvgPoolConnector
from . import common
from .common import FormatError
from .towers import expect_keys, projector_tensors, tower_from_tensors

NAME = "gemma3"
architecture = "Gemma3ForConditionalGeneration"  # the transformers class that loads this format
DECODER = "gemma3_text"
LAYOUTS = ("fixed", "pan_and_scan")
# pan_and_scan option -> Gemma3ImageProcessor field, and Gemma3Processor's default when the field is null
PAN_FIELDS = {
    "min_crop_size": ("pan_and_scan_min_crop_size", 256),
    "max_num_crops": ("pan_and_scan_max_num_crops", 4),
    "min_ratio_to_activate": ("pan_and_scan_min_ratio_to_activate", 1.2),
}
_WEIGHT, _NORM = "mm_input_projection_weight", "mm_soft_emb_norm.weight"
_NATIVE = "save format='native' (holds every connector, layout and attention)"


def check(vlm: VLMParts) -> None:
    """Refuse what Gemma 3 cannot express, naming what and ``native`` (``vlm``: the parts, or the
    VisionLanguageModel, which has the same attributes)."""
    common.check_plain_decoder(vlm.decoder, NAME)
    if vlm.layout.name not in LAYOUTS:
        raise FormatError(
            f"Gemma 3 takes the 'fixed' or 'pan_and_scan' image layout; this VLM's is {vlm.layout.name!r}: "
            f"save {common.formats_for_layout(vlm.layout.name)}"
        )
    fam = family(vlm.decoder)
    if fam != DECODER:
        raise FormatError(f"Gemma 3 takes a {DECODER} decoder; this VLM's is {fam!r}: {_NATIVE}")
    if getattr(vlm.decoder.config, "final_logit_softcapping", None):
        raise FormatError(
            "Gemma3ForConditionalGeneration's head applies no final-logit soft-capping, which this decoder "
            f"needs: {_NATIVE}"
        )
    c = vlm.connector
    if c.name != "avg_pool":
        raise FormatError(
            f"Gemma 3's projector is avg_pool (pool, RMSNorm, linear); this VLM's connector is {c.name!r}: "
            f"{_NATIVE}"
        )
    eps = vlm.tower.config.layer_norm_eps
    if c.options["eps"] != eps:
        raise FormatError(
            f"Gemma 3's projector normalises with the tower's layer_norm_eps ({eps}); this VLM's avg_pool "
            f"has eps={c.options['eps']}: build it with eps={eps}, or {_NATIVE}"
        )
    if vlm.attention != "image_bidirectional":
        raise FormatError(
            f"Gemma 3 attends causally with each image's tokens both ways; this VLM uses {vlm.attention} "
            f"attention: build it with attention='image_bidirectional', or {_NATIVE}"
        )
    if vlm.tower.feature_layer != -1:
        raise FormatError(
            f"Gemma 3 reads the tower's final post-layernorm output (feature_layer=-1); this VLM reads "
            f"feature_layer={vlm.tower.feature_layer}: {_NATIVE}"
        )


def _pan_and_scan(parts: VLMParts) -> dict[str, Any]:
    """The image processor's pan-and-scan fields for the VLM's layout."""
    if parts.layout.name != "pan_and_scan":
        return {"do_pan_and_scan": False}
    size = parts.tower.config.image_size
    layout = parts.layout.build(CropShape.of(parts.connector, (size, size), tower_grid(parts.tower)))
    fields = {field: getattr(layout, option) for option, (field, _) in PAN_FIELDS.items()}
    return {"do_pan_and_scan": True, **fields}


def _token_id(tokenizer: Any, token: str, default: int) -> int:
    """The tokenizer's id of ``token`` when it holds it, else ``default`` (Gemma3Config's)."""
    if tokenizer is None or token not in tokenizer.get_vocab():
        return default
    return int(tokenizer.convert_tokens_to_ids(token))


def save(parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
    check(parts)
    split = common.split_weights(parts.decoder, state_dict)
    projector = {
        _WEIGHT: split["connector"]["proj.weight"].t(),  # (in_dim, out_dim): Gemma 3 multiplies on the right
        _NORM: split["connector"]["norm.weight"],
    }
    processor = parts.processor or ImageProcessor(image_size=parts.tower.config.image_size)
    kind = "Gemma3ImageProcessor" + ("Pil" if processor.backend == "pil" else "")
    defaults = {f.name: f.default for f in dataclasses.fields(_config_class())}
    common.write_multimodal(
        dataclasses.replace(parts, processor=processor),
        split,
        projector,
        out,
        architecture=architecture,
        model_type=NAME,
        fields={
            "mm_tokens_per_image": parts.num_image_tokens,
            "boi_token_index": _token_id(parts.tokenizer, BOI, defaults["boi_token_index"]),
            "eoi_token_index": _token_id(parts.tokenizer, EOI, defaults["eoi_token_index"]),
        },
        processor_fields={"image_processor_type": kind, **_pan_and_scan(parts)},
        processor_config={"processor_class": "Gemma3Processor", "image_seq_length": parts.num_image_tokens},
    )


def _config_class() -> Any:
    from transformers import Gemma3Config

    return Gemma3Config


def _connector(hf: Any, proj: dict[str, torch.Tensor], source: str) -> AvgPoolConnector:
    """The avg_pool connector of Gemma 3's projector tensors (``mm_tokens_per_image``: its tokens)."""
    expect_keys(proj, {_WEIGHT, _NORM}, source)
    tokens = int(hf.mm_tokens_per_image)
    side = math.isqrt(tokens)
    patches = hf.vision_config.image_size // hf.vision_config.patch_size
    if side * side != tokens or patches % side:
        raise CheckpointError(
            f"{source}: mm_tokens_per_image {tokens} is not the square of a divisor of the tower's "
            f"{patches} patches per side (Gemma 3 average-pools whole windows)"
        )
    weight = proj[_WEIGHT]  # (in_dim, out_dim)
    eps = float(hf.vision_config.layer_norm_eps)
    connector = AvgPoolConnector(weight.shape[0], weight.shape[1], tokens_per_side=side, eps=eps)
    tensors = {"proj.weight": weight.t().contiguous(), "norm.weight": proj[_NORM]}
    strict_load(connector, tensors, source=f"{source} (multi_modal_projector)")
    return connector


def _image_processor_config(path: Path) -> dict[str, Any] | None:
    """The image processor's fields: ``preprocessor_config.json`` (as this writer and transformers 4.x save
    them), else the ``image_processor`` section of ``processor_config.json`` (transformers 5.x's processor
    save), else None."""
    if (path / "preprocessor_config.json").exists():
        return read_processor_config(path)[1]
    file = path / "processor_config.json"
    if not file.exists():
        return None
    return read_json_object(file, {"image_processor": dict}).get("image_processor")


def _layout(config: dict[str, Any] | None) -> LayoutConfig:
    """``pan_and_scan`` with the image processor's options when it pans and scans by default, else
    ``fixed`` (also without an image processor config)."""
    if not config or not config.get("do_pan_and_scan"):
        return LayoutConfig()
    options = {}
    for option, (field, default) in PAN_FIELDS.items():
        value = config.get(field)
        options[option] = default if value is None else value
    return LayoutConfig("pan_and_scan", options)


def load(path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
    source = str(path)
    hf, sd = common.read_multimodal(path)
    tower = tower_from_tensors(sd, hf.vision_config, source=source, feature_layer=-1, dtype=dtype)
    connector = _connector(hf, projector_tensors(sd, source), source)
    decoder = common.multimodal_decoder(path, hf.text_config, dtype=dtype, device=device)
    parts = common.folder_parts(
        path,
        tower,
        connector,
        decoder,
        image_token_id=int(hf.image_token_id),
        attention="image_bidirectional",
    )
    config = _image_processor_config(path)
    parts.layout = _layout(config)
    if parts.processor is None and config is not None:  # saved inside processor_config.json
        try:
            parts.processor = ImageProcessor.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{path / 'processor_config.json'}: image_processor: {err}") from err
    return parts
