"""transformers' ``Idefics3ForConditionalGeneration`` (format ``idefics3``) and
``SmolVLMForConditionalGeneration`` (``smolvlm``) layouts: a Llama-family (SmolLM) decoder behind the
``pixel_shuffle`` connector with one bias-free linear projection, on the tower's final post-layernorm
output, causal attention, and the ``split`` image layout (tower-sized tiles and a global image).

config.json               model_type "idefics3" / "smolvlm": vision_config (the tower as
                          Idefics3VisionConfig / SmolVLMVisionConfig), text_config, scale_factor (the pixel
                          shuffle factor), image_token_id, tie_word_embeddings
model.safetensors         (or an index and shards) model.vision_model.*, model.connector.modality_projection
                          .proj.weight, model.text_model.*, lm_head.weight (left out when tied)
tokenizer files, preprocessor_config.json   when the VLM has them; the image processor is
                          Idefics3ImageProcessor / SmolVLMImageProcessor with the tower processor's
                          statistics and filter, size {"longest_edge"} and do_image_splitting of the layout,
                          max_image_size {"longest_edge": the tile}, do_pad (the batch's crops padded with
                          empty images, which the models drop)
processor_config.json     with both: Idefics3Processor / SmolVLMProcessor with image_seq_len, the tokens of a
                          crop (transformers' SmolVLMProcessor needs the ``num2words`` package to be built)
tower_swap.json           when a tower swap made the VLM

Idefics3's tower looks its position embeddings up by bucketing each patch's fractional position
(:mod:`vision_tower.formats.idefics3`); for whole tiles at the tower's size that is the plain table the
SigLIP tower adds when the bucketing is the identity, as it is for every released size. Tower sizes where
float32 rounding makes it another lookup are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vision_tower import CheckpointError, VisionTower
from vision_tower.checkpoint import read_checkpoint, strict_load
from vision_tower.formats import idefics3 as tower_format
from vision_tower.formats.transformers import vision_state_dict_hf

from ..decoder import family, load_decoder, no_code_from_files
from ..decoder_files import read_transformers_config
from ..layouts import CropShape, LayoutConfig
from ..layouts.split import Split
from ..parts import VLMParts, tower_grid
from ..pixel_shuffle import PixelShuffleConnector
from .common import (
    SPLIT_DEFAULT_TILE,
    FormatError,
    check_plain_decoder,
    folder_parts,
    formats_for_layout,
    image_processor_settings,
    is_tied,
    split_weights,
    text_config,
    write_extras,
    write_weights,
)

LAYOUT = "split"
DECODERS = ("llama",)  # Idefics3-8B's Llama 3, SmolVLM's SmolLM / SmolLM2 (Llama architecture)
IMAGE_TOKEN = "<image>"  # Idefics3Processor's placeholder, fixed in its code
VISION = "model.vision_model."
PROJECTION = "model.connector.modality_projection.proj.weight"
TEXT = "model.text_model."
# the decoder's keys renamed to a causal LM's (lm_head.* keeps its name)
_DECODER_KEY_MAPPING = {r"^model\.text_model\.": "model."}


class Idefics3Family:
    """One of the two formats (``name`` is transformers' ``model_type``): the same model, key layout and
    processor arguments under two class names."""

    def __init__(self, name: str, title: str, prefix: str) -> None:
        self.name = name
        self.title = title
        self.layout = LAYOUT
        self.architecture = f"{prefix}ForConditionalGeneration"
        self.processor_class = f"{prefix}Processor"
        self.image_processor = f"{prefix}ImageProcessor"
        self.vision_model_type = f"{name}_vision"

    # ------------------------------------------------------------------ refusals
    def check(self, vlm: VLMParts) -> None:
        """Refuse what the format cannot express, saying which format can hold it (``vlm``: the parts, or
        the VisionLanguageModel, which has the same attributes)."""
        title = self.title
        check_plain_decoder(vlm.decoder, self.name)
        found = vlm.layout.name
        if found != LAYOUT:
            raise FormatError(
                f"{title} splits images with the {LAYOUT!r} image layout; this VLM's is {found!r}: save "
                f"{formats_for_layout(found)}"
            )
        fam = family(vlm.decoder)
        if fam not in DECODERS:
            raise FormatError(
                f"{title} export is tested for Llama-family (SmolLM) decoders, not {fam!r}: save "
                "format='native'"
            )
        c = vlm.connector
        if c.name != "pixel_shuffle" or c.options["depth"] != 1 or c.options["bias"]:
            raise FormatError(
                f"{title}'s connector is a pixel shuffle then one bias-free linear layer; this VLM's is "
                f"{c.name!r} {c.options}: build connector 'pixel_shuffle' with depth=1, bias=False, or save "
                "format='native'"
            )
        if vlm.attention != "causal":
            raise FormatError(
                f"{title} attends causally everywhere; this VLM uses {vlm.attention} attention: save "
                "format='native', or build the VLM with attention='causal'"
            )
        if vlm.tower.feature_layer != -1:
            raise FormatError(
                f"{title} feeds the tower's final post-layernorm output (feature_layer=-1); this VLM reads "
                f"feature_layer={vlm.tower.feature_layer}: save format='native'"
            )
        side = tower_grid(vlm.tower)[0]
        if not torch.equal(tower_format.position_rows(side, side), torch.arange(side)):
            raise FormatError(
                f"{title}'s tower looks positions up by bucketing, which for a {side}x{side} patch grid "
                "reads other rows than the plain table this tower adds: save format='native', or use a "
                "tower whose image_size / patch_size is another number (26, 27 and 32 hold)"
            )
        tokenizer = vlm.tokenizer
        if tokenizer is not None and tokenizer.convert_ids_to_tokens(vlm.image_token_id) != IMAGE_TOKEN:
            token = tokenizer.convert_ids_to_tokens(vlm.image_token_id)
            raise FormatError(
                f"{self.processor_class} writes {IMAGE_TOKEN!r} for image placeholders; this VLM's image "
                f"token is {token!r}: build it with the image_token_id of {IMAGE_TOKEN!r}, or save "
                "format='native'"
            )

    # ------------------------------------------------------------------ writing
    def save(self, parts: VLMParts, out: Path, state_dict: dict[str, torch.Tensor]) -> None:
        self.check(parts)
        layout = _built(parts)
        weights = split_weights(parts.decoder, state_dict)
        tensors = {f"model.{k}": v for k, v in vision_state_dict_hf(weights["tower"]).items()}
        tensors[PROJECTION] = weights["connector"]["proj.0.weight"]
        for key, value in weights["decoder"].items():  # model.* (the body) and lm_head.*
            tensors[TEXT + key.removeprefix("model.") if key.startswith("model.") else key] = value
        config = {
            "architectures": [self.architecture],
            "model_type": self.name,
            "vision_config": self.vision_config(parts),
            "text_config": text_config(parts.decoder),
            "scale_factor": parts.connector.options["factor"],
            "image_token_id": parts.image_token_id,
            "tie_word_embeddings": is_tied(parts.decoder),
        }
        write_weights(tensors, out, config)
        write_extras(
            parts,
            out,
            {"processor_class": self.processor_class, "image_seq_len": layout.crop.tokens},
            image_processor_type=self.image_processor,
            size={"longest_edge": layout.longest_edge},
            max_image_size={"longest_edge": layout.tile},
            do_image_splitting=layout.do_image_splitting,
            do_pad=True,
        )

    def vision_config(self, parts: VLMParts) -> dict[str, Any]:
        """The tower as transformers' Idefics3VisionConfig / SmolVLMVisionConfig fields."""
        hf = parts.tower.config.to_hf()
        fields = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
            "hidden_act",
            "layer_norm_eps",
            "attention_dropout",
        )
        return {**{k: hf[k] for k in fields}, "model_type": self.vision_model_type}

    # ------------------------------------------------------------------ reading
    def options(self, hf: Any, source: str) -> dict[str, Any]:
        """The ``split`` layout's options from the image processor saved in the checkpoint folder ``source``
        (none there: the layout's defaults), checked against the tower's size in ``hf`` (its transformers
        config)."""
        tile = int(hf.vision_config.image_size)
        settings = image_processor_settings(Path(source))
        if settings is None:
            return {}
        file, preprocessor = settings
        most = (preprocessor.get("max_image_size") or {}).get("longest_edge", SPLIT_DEFAULT_TILE)
        if most != tile:
            raise CheckpointError(
                f"{file}: the image processor's max_image_size {most} is not the tower's image_size "
                f"{tile}; the split layout cuts tiles of the tower's size"
            )
        size = preprocessor.get("size") or {}
        if "longest_edge" not in size:
            raise CheckpointError(
                f"{file}: the image processor's size {size!r} has no longest_edge (Idefics3's resize)"
            )
        return {
            "longest_edge": int(size["longest_edge"]),
            "do_image_splitting": bool(preprocessor.get("do_image_splitting", True)),
        }

    def load(self, path: Path, config: dict[str, Any], *, dtype, device) -> VLMParts:
        source = str(path)
        with no_code_from_files(path):
            hf = read_transformers_config(path)
        sd, _ = read_checkpoint(path, keep=lambda k: k.startswith(VISION) or k == PROJECTION)
        tower_sd = {k: v for k, v in sd.items() if k.startswith(VISION)}
        # the whole config.json: the tower reader turns Idefics3's bucketed position lookup into a table
        tower = VisionTower.from_state_dict(
            tower_sd, config, source=source, feature_layer=-1, use_head=False, dtype=dtype, copy=False
        )
        if PROJECTION not in sd:
            raise CheckpointError(f"{source} holds no {PROJECTION}")
        weight = sd[PROJECTION]  # (decoder width, factor^2 * tower width)
        factor = int(hf.scale_factor)
        connector = PixelShuffleConnector(tower.config.hidden_size, weight.shape[0], factor=factor)
        strict_load(connector, {"proj.0.weight": weight}, source=f"{source} (modality_projection)")
        decoder = load_decoder(
            path,
            dtype=dtype,
            device=device,
            config=hf.text_config,
            key_mapping=_DECODER_KEY_MAPPING,
            other_prefixes=(VISION, "model.connector."),
        )
        parts = folder_parts(
            path, tower, connector, decoder, image_token_id=int(hf.image_token_id), attention="causal"
        )
        parts.layout = LayoutConfig(LAYOUT, self.options(hf, source))
        return parts


def _built(parts: VLMParts) -> Split:
    """The VLM's ``split`` layout built for its tower and connector (its tile, longest edge and tokens)."""
    size = parts.tower.config.image_size
    return parts.layout.build(CropShape.of(parts.connector, (size, size), tower_grid(parts.tower)))


IDEFICS3 = Idefics3Family("idefics3", "Idefics3", "Idefics3")
SMOLVLM = Idefics3Family("smolvlm", "SmolVLM", "SmolVLM")
