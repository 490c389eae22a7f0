"""Checkpoint formats of the VLM: ``native`` (everything), ``paligemma``, ``llava``, ``llava_next``,
``llava_onevision``, ``idefics3``, ``smolvlm`` and ``gemma3`` (transformers loads them).

Each format (a module, or for the tiled LLaVA formats and Idefics3/SmolVLM an object of :mod:`.llava_next`
/ :mod:`.idefics3`) has
``save(parts, out, state_dict)``, ``load(path, config, dtype=, device=) -> VLMParts``, ``check(parts)`` (the
refusals its ``save`` makes first) and ``architecture`` (the transformers class that loads it; None for
native); ``VisionLanguageModel`` assembles what ``load`` returns. :mod:`.capacity` tabulates what each
format's ``check`` lets through."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vision_tower.checkpoint import current_umask, read_json_object
from vision_tower.hub import resolve

from ..decoder import config_rows, no_code_from_files
from ..decoder_files import read_transformers_config
from ..parts import VLMParts
from . import gemma3, llava, native, paligemma
from .common import FormatError
from .idefics3 import IDEFICS3, SMOLVLM
from .llava_next import LLAVA_NEXT, LLAVA_ONEVISION

FORMATS = {
    "native": native,
    "paligemma": paligemma,
    "llava": llava,
    "llava_next": LLAVA_NEXT,
    "llava_onevision": LLAVA_ONEVISION,
    "idefics3": IDEFICS3,
    "smolvlm": SMOLVLM,
    "gemma3": gemma3,
}
# config.json's model_type -> format: each transformers format under its own name, ours under its own
_BY_MODEL_TYPE = {name: fmt for name, fmt in FORMATS.items() if name != "native"}
_BY_MODEL_TYPE[native.MODEL_TYPE] = native


def check(parts: VLMParts, format: str) -> None:
    """Raise the :class:`FormatError` with which ``format``'s writer refuses ``parts`` (a VLMParts or a
    VisionLanguageModel), if it does."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    FORMATS[format].check(parts)


def save(
    parts: VLMParts, out_dir: str | os.PathLike, *, format: str, state_dict: dict[str, torch.Tensor]
) -> None:
    """Write ``parts`` with the weights of ``state_dict`` (the VLM's names: ``tower.*``, ``connector.*``,
    ``decoder.*``) in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    out = Path(out_dir)
    FORMATS[format].save(parts, out, state_dict)
    mode = 0o666 & ~current_umask()
    for weights in out.rglob("*.safetensors"):  # transformers' writer creates them 0600
        os.chmod(weights, mode)


def checkpoint_format(config: dict, source: str) -> str:
    """The format of a checkpoint from its config.json ``model_type``."""
    kind = config.get("model_type")
    for name, module in FORMATS.items():
        if _BY_MODEL_TYPE.get(kind) is module:
            return name
    raise ValueError(
        f"{source} is not a VLM checkpoint: config.json model_type {kind!r}; readable: "
        f"{', '.join(sorted(_BY_MODEL_TYPE))}"
    )


def load(
    src: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VLMParts:
    """The parts of the VLM checkpoint in ``src`` (a folder or hub id), its format detected from
    config.json."""
    path = resolve(src, revision=revision, cache_dir=cache_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{src}: no config.json")
    config = read_json_object(path / "config.json", {"model_type": str})
    fmt = checkpoint_format(config, str(src))
    return FORMATS[fmt].load(path, config, dtype=dtype, device=device)


def decoder_rows(src: str | os.PathLike) -> int:
    """Rows of the decoder's input embedding table in the VLM checkpoint ``src``, from its configs (no
    weights read)."""
    path = resolve(src)
    config = read_json_object(path / "config.json", {"model_type": str})
    if checkpoint_format(config, str(src)) == "native":
        return config_rows(path / "decoder")
    with no_code_from_files(path):
        return int(read_transformers_config(path).get_text_config().vocab_size)


__all__ = [
    "FORMATS",
    "FormatError",
    "VLMParts",
    "check",
    "checkpoint_format",
    "decoder_rows",
    "load",
    "save",
]
