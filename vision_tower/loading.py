"""Read checkpoints of any registered layout into this package's layout.

Pure I/O: this module never imports the model classes. It hands them :class:`Weights` (a config plus a
state dict in our layout), which they load strictly. The layout is found from the keys and read by its
:class:`~.formats.Format` (:mod:`.formats`); hyperparameters the weights do not carry come from
``config.json`` and the config files a format asks for (``open_clip_config.json``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, read_checkpoint, read_json
from .formats import Files, detect_format, get_format, list_formats, open_clip
from .hub import resolve

Tensor = torch.Tensor


@dataclass
class Weights:
    """A checkpoint read into this package's layout, ready for a model of ``config`` to load strictly.

    ``ignored`` are source keys that mapped to nothing (reported as unexpected by the strict load);
    ``layout`` names the layout it was read from.
    """

    config: Any  # VisionConfig, NaFlexVisionConfig or SiglipConfig
    state_dict: dict[str, Tensor]
    source: str
    ignored: list[str] = field(default_factory=list)
    layout: str = "transformers"


def _formats():
    return [get_format(name) for name in list_formats()]


def _read(path: Path, keep_vision_only: bool) -> Files:
    """Tensors (only the image tower's when ``keep_vision_only``) and config files of a folder or file."""
    folder = path if path.is_dir() else path.parent
    extra = {
        name: read_json(folder / name)
        for fmt in _formats()
        for name in fmt.config_files
        if (folder / name).exists()
    }
    for fmt in _formats():
        if fmt.open_weights is not None:
            sd = fmt.open_weights(path, keep_vision_only)
            if sd is not None:
                return Files(sd, None, extra)
    tower = folder / "tower"
    if path.is_dir() and (tower / "config.json").is_file() and not list(path.glob("model*.safetensors*")):
        raise CheckpointError(
            f"{path} holds a vision-language model (its parts in sub-folders), not a SigLIP checkpoint: "
            f"its vision tower is the folder {tower}"
        )
    not_vision = tuple(p for fmt in _formats() for p in fmt.non_vision_prefixes)
    keep = (lambda key: not key.startswith(not_vision)) if keep_vision_only else (lambda key: True)
    sd, config = read_checkpoint(path, keep=keep)
    return Files(sd, config, extra)


def _keep_head(native: dict[str, Tensor], config: Any, use_head: bool | None, source: str) -> None:
    has_head = "head.probe" in native
    if use_head and not has_head:
        raise CheckpointError(f"use_head=True but {source} has no attention-pooling head")
    config.use_head = has_head if use_head is None else use_head
    if not config.use_head:
        for key in [k for k in native if k.startswith("head.")]:
            del native[key]


def vision_weights_from_files(files: Files, *, source: str, use_head: bool | None = None) -> Weights:
    """The image tower of a checkpoint's tensors and config files, in any layout."""
    fmt = detect_format(files.state_dict, source)
    native, config, leftover = fmt.read_vision(files, source)
    _keep_head(native, config, use_head, source)
    return Weights(config, native, source, leftover, fmt.name)


def vision_weights_from_state_dict(
    sd: dict[str, Tensor],
    config: dict[str, Any] | None,
    *,
    source: str,
    use_head: bool | None = None,
    open_clip_config: dict[str, Any] | None = None,
) -> Weights:
    """The image tower of an in-memory state dict in any layout and its config dict(s)."""
    extra = {} if open_clip_config is None else {open_clip.CONFIG_NAME: open_clip_config}
    return vision_weights_from_files(Files(sd, config, extra), source=source, use_head=use_head)


def read_vision_weights(
    src: str | os.PathLike,
    *,
    use_head: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Weights:
    """The image tower of a folder, file or hub repo id; the rest of the checkpoint is never read."""
    files = _read(resolve(src, revision=revision, cache_dir=cache_dir), keep_vision_only=True)
    return vision_weights_from_files(files, source=str(src), use_head=use_head)


def read_siglip_weights(
    src: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Weights:
    """Both towers, t' and b of a SigLIP checkpoint (transformers, open_clip or big_vision layout)."""
    files = _read(resolve(src, revision=revision, cache_dir=cache_dir), keep_vision_only=False)
    source = str(src)
    fmt = detect_format(files.state_dict, source)
    native, cfg, leftover = fmt.read_siglip(files, source)
    cfg.vision.use_head = "vision.head.probe" in native
    return Weights(cfg, native, source, leftover, fmt.name)
