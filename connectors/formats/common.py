"""What the checkpoint formats share: the refusal error, sharded writing, tokenizer and processor files.

Formats read and write :class:`~connectors.parts.VLMParts`; they never import the model class, which
assembles the parts it reads (``VisionLanguageModel.from_pretrained``) and hands its parts to a writer
(``save_pretrained``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import PreTrainedModel

from vision_tower import ImageProcessor
from vision_tower.checkpoint import read_checkpoint, read_json_object
from vision_tower.formats.keys import part
from vision_tower.formats.transformers import vision_state_dict_hf
from vision_tower.processor import read_config as read_processor_config

from ..chat_template import processor_template
from ..decoder import load_decoder, load_tokenizer, no_code_from_files
from ..decoder_files import read_transformers_config
from ..parts import VLMParts
from ..swap import read_swap, write_swap

Tensor = torch.Tensor
MAX_SHARD_SIZE = "5GB"
# tower and projector keys of PaliGemma / LLaVA checkpoints: saved layout (4.x and 5.x) and 5.x in-memory
# layout
MULTIMODAL_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
# the decoder's keys in the same checkpoints, renamed to a causal LM's (``model.*``, ``lm_head.*``)
DECODER_KEY_MAPPING = {
    r"^language_model\.model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^model\.language_model\.": "model.",
}


class FormatError(ValueError):
    """A VLM that a checkpoint format cannot express; the message says what and which format can hold it."""


# the formats (besides native) that hold each image layout
LAYOUT_FORMATS = {
    "fixed": ("paligemma", "llava", "gemma3"),
    "anyres": ("llava_next",),
    "anyres_max": ("llava_onevision",),
    "split": ("idefics3", "smolvlm"),
    "pan_and_scan": ("gemma3",),
}


def formats_for_layout(layout: str) -> str:
    """The formats to name in a refusal for a VLM of image ``layout``: those that hold it, then native."""
    own = "".join(f"format={f!r} or " for f in LAYOUT_FORMATS.get(layout, ()))
    return f"{own}format='native' (holds every layout)"


def check_fixed_layout(parts: Any, fmt: str) -> None:
    """Refuse a tiled image layout in a format of one fixed-size image per placeholder block (``parts``: a
    VLMParts or the VisionLanguageModel, whose ``layout`` has the same ``name``)."""
    name = parts.layout.name
    if name != "fixed":
        raise FormatError(
            f"{fmt} takes one image squashed to the tower's size; this VLM's image layout is {name!r}: save "
            f"{formats_for_layout(name)}"
        )


def check_plain_decoder(decoder: Any, fmt: str) -> None:
    """A transformers model, not a peft wrapper (whose save writes adapters only), with its body under
    ``model``."""
    if not isinstance(decoder, PreTrainedModel) or (fmt != "native" and decoder.base_model_prefix != "model"):
        where = "" if fmt == "native" else " with its body under 'model'"
        fix = "" if fmt == "native" else ", or save format='native'"
        raise FormatError(
            f"format {fmt!r} needs a plain transformers causal LM{where} (got {type(decoder).__name__}); "
            f"merge adapters first (peft: vlm.decoder = vlm.decoder.merge_and_unload()){fix}"
        )


def is_tied(decoder: PreTrainedModel) -> bool:
    return bool(getattr(decoder.config.get_text_config(), "tie_word_embeddings", False))


def split_weights(decoder: PreTrainedModel, sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """A VLM's state dict split by part (``tower``, ``connector``, ``decoder``, ``layout_params``: the image
    layout's learned tensors), prefixes removed; a tied ``lm_head`` is left out (safetensors stores no shared
    tensors; transformers ties it again)."""
    names = ("tower", "connector", "decoder", "layout_params")
    out = {name: part(sd, name + ".") for name in names}
    stray = sorted(k for k in sd if not k.startswith(tuple(f"{n}." for n in names)))
    if stray:
        raise ValueError(f"state dict keys outside tower/connector/decoder/layout_params: {stray[:10]}")
    if is_tied(decoder):
        out["decoder"].pop("lm_head.weight", None)
    return out


def multimodal_tensors(
    tower: dict[str, Tensor],
    projector: dict[str, Tensor],
    decoder: dict[str, Tensor],
    layout: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """PaliGemma / LLaVA key layout as saved by transformers 4.x (which 5.x reads too); the image layout's
    tensors (LLaVA-NeXT's ``image_newline``) at the top level under their own names."""
    out = {f"vision_tower.{k}": v for k, v in vision_state_dict_hf(tower).items()}
    out.update({f"multi_modal_projector.{k}": v for k, v in projector.items()})
    out.update({f"language_model.{k}": v for k, v in decoder.items()})
    out.update(layout or {})
    return out


def text_config(decoder: PreTrainedModel) -> dict[str, Any]:
    cfg = decoder.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return cfg


def write_weights(sd: dict[str, Tensor], out: Path, config: dict[str, Any]) -> None:
    """``config.json`` and safetensors shards (``model.safetensors`` or an index plus shards)."""
    out.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(
        {k: _own_storage(v.detach().cpu()) for k, v in sd.items()},
        out,
        max_shard_size=MAX_SHARD_SIZE,
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _own_storage(t: Tensor) -> Tensor:
    """``t`` itself, or a copy when it is a view into a bigger storage (a q/k/v slice of a fused tensor)."""
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone(memory_format=torch.contiguous_format)


def write_extras(
    parts: VLMParts, out: Path, processor_config: dict[str, Any] | None = None, **processor_fields: Any
) -> None:
    """Tokenizer files (with the VLM's chat template as the tokenizer's: ``chat_template.jinja``) and
    ``preprocessor_config.json`` (with ``processor_fields`` added), when the VLM has them,
    ``processor_config.json`` (the multimodal processor's own arguments, which transformers' ``AutoProcessor``
    reads) when both are there, and the tower swap record when a swap made the VLM."""
    write_swap(parts.tower_swap, out)
    if parts.tokenizer is not None:
        _save_tokenizer(parts.tokenizer, out, parts.chat_template)
    if processor_config and parts.tokenizer is not None and parts.processor is not None:
        (out / "processor_config.json").write_text(
            json.dumps(processor_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    if parts.processor is not None:
        file = parts.processor.with_image_size(parts.tower.config.image_size).save_pretrained(out)
        if processor_fields:
            data = json.loads(file.read_text(encoding="utf-8"))
            file.write_text(
                json.dumps({**data, **processor_fields}, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )


def _save_tokenizer(tokenizer: Any, out: Path, chat_template: str | None) -> None:
    """``tokenizer``'s files, with ``chat_template`` as its template (its own when None); the live tokenizer
    is left as it was."""
    own = getattr(tokenizer, "chat_template", None)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = own


def write_processor_template(parts: VLMParts, out: Path, image_token: str) -> None:
    """``chat_template.json``: the VLM's chat template as the multimodal processor applies it
    (:func:`connectors.chat_template.processor_template`), when the folder holds a processor and the VLM a
    template. transformers' processors read it before ``chat_template.jinja`` (the tokenizer's, which keeps
    the template as training renders it); tokenizers do not read it."""
    if parts.chat_template is None or parts.tokenizer is None or parts.processor is None:
        return
    template = processor_template(parts.chat_template, parts.tokenizer, image_token)
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": template}, indent=2) + "\n", encoding="utf-8"
    )


def write_multimodal(
    parts: VLMParts,
    weights: dict[str, dict[str, Tensor]],
    projector: dict[str, Tensor],
    out: Path,
    *,
    architecture: str,
    model_type: str,
    fields: dict[str, Any],
    vision_config: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    processor_fields: dict[str, Any] | None = None,
    processor_config: dict[str, Any] | None = None,
) -> None:
    """A PaliGemma / LLaVA folder: config.json (the keys both share, then ``fields``), the tower, projector,
    decoder and image layout tensors in transformers' layout, and the tokenizer and processor files.
    ``vision_config`` and ``text`` default to the tower's and the decoder's transformers configs."""
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vision_config": parts.tower.config.to_hf() if vision_config is None else vision_config,
        "text_config": text_config(parts.decoder) if text is None else text,
        "image_token_index": parts.image_token_id,
        **fields,
        "tie_word_embeddings": is_tied(parts.decoder),
    }
    tensors = multimodal_tensors(weights["tower"], projector, weights["decoder"], weights["layout_params"])
    write_weights(tensors, out, config)
    write_extras(parts, out, processor_config, **(processor_fields or {}))


def read_multimodal(path: Path, extra: tuple[str, ...] = ()) -> tuple[Any, dict[str, Tensor]]:
    """A PaliGemma / LLaVA checkpoint's transformers config (with the defaults that hub configs leave out)
    and its tower and projector tensors, and those whose names start with ``extra`` (the decoder's are not
    read here)."""
    with no_code_from_files(path):
        config = read_transformers_config(path)
    sd, _ = read_checkpoint(path, keep=lambda k: k.startswith(MULTIMODAL_PREFIXES + extra))
    return config, sd


def multimodal_decoder(
    path: Path, text_config: Any, *, dtype, device, extra: tuple[str, ...] = ()
) -> PreTrainedModel:
    """The decoder of a PaliGemma / LLaVA checkpoint: its tensors only, renamed to a causal LM's, strictly
    (tensors under ``extra`` are the checkpoint's others, as the tower's and the projector's)."""
    return load_decoder(
        path,
        dtype=dtype,
        device=device,
        config=text_config,
        key_mapping=DECODER_KEY_MAPPING,
        other_prefixes=MULTIMODAL_PREFIXES + extra,
    )


def folder_parts(
    path: Path, tower: Any, connector: Any, decoder: PreTrainedModel, *, image_token_id: int, attention: str
) -> VLMParts:
    """The parts read from a checkpoint folder, with the tokenizer (its chat template the VLM's), processor
    and tower swap record saved in it."""
    tokenizer, processor = read_extras(path)
    template = getattr(tokenizer, "chat_template", None)
    return VLMParts(
        tower,
        connector,
        decoder,
        image_token_id,
        attention,
        tokenizer,
        processor,
        read_swap(path),
        chat_template=template if isinstance(template, str) else None,
    )


# image processors of tiled layouts, whose ``do_pad`` pads each image's crops to the batch's most (a batch of
# flat crops needs none): read as the tower processor they are per crop
TILING_PROCESSORS = ("LlavaNextImageProcessor", "LlavaOnevisionImageProcessor")
# image processors of the split layout: read as the tower processor of their tiles (max_image_size); the
# layout's resize and splitting options are the format's to read
SPLIT_PROCESSORS = ("Idefics3ImageProcessor", "SmolVLMImageProcessor")
SPLIT_DEFAULT_TILE = 364  # their max_image_size when the config leaves it out


def image_processor_settings(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """(file, fields) of the image processor saved in ``folder``: ``preprocessor_config.json`` (hub folders,
    transformers 4.x), else the ``image_processor`` object inside ``processor_config.json`` (where
    transformers 5.x's ``ProcessorMixin.save_pretrained`` puts it); None without either."""
    if (folder / "preprocessor_config.json").exists():
        return read_processor_config(folder)
    file = folder / "processor_config.json"
    if file.exists():
        nested = read_json_object(file).get("image_processor")
        if isinstance(nested, dict):
            return file, nested
    return None


def read_extras(folder: Path) -> tuple[Any | None, ImageProcessor | None]:
    """(tokenizer, image processor) saved in ``folder``, each None when its files are absent."""
    tokenizer = load_tokenizer(folder)
    processor = None
    settings = image_processor_settings(folder)
    if settings is not None:
        file, config = settings
        kind = str(config.get("image_processor_type", "")).removesuffix("Pil")
        if kind in TILING_PROCESSORS:
            config = {k: v for k, v in config.items() if k != "do_pad"}
        if kind in SPLIT_PROCESSORS:
            tile = (config.get("max_image_size") or {}).get("longest_edge", SPLIT_DEFAULT_TILE)
            config = {k: v for k, v in config.items() if k not in ("size", "do_pad")}
            config["size"] = {"height": tile, "width": tile}
        try:
            processor = ImageProcessor.from_dict(config)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err
    return tokenizer, processor
