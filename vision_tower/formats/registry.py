"""The registry of tower checkpoint layouts, like the presets: one :class:`Format` per layout module.

A format says how its checkpoints are recognised (``detect`` over the set of keys), how the image
tower or both towers are read into this package's layout (``read_vision`` / ``read_siglip``: a
config plus a state dict in our keys, and the source keys that mapped to nothing), and how they are
written (``write_vision`` / ``write_siglip``, where the layout can be written). Formats are tried in
the order they were registered.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
OutDir = str | os.PathLike  # a writer's target folder


@dataclass
class Files:
    """What a model folder or file holds: the tensors kept, its ``config.json``, and the other config
    files a format asked for (:attr:`Format.config_files`), by file name."""

    state_dict: dict[str, Tensor]
    config: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)


# (state dict in our layout, config, source keys that mapped to nothing)
Read = tuple[dict[str, Tensor], Any, list[str]]
Reader = Callable[[Files, str], Read]
Writer = Callable[..., Path]


@dataclass(frozen=True)
class Format:
    """One checkpoint layout. ``where`` says where its checkpoints come from and ``looks_for`` which keys
    identify it (both for error messages). ``read_siglip`` and the writers may raise a ``CheckpointError``
    / ``ValueError`` saying why this layout cannot hold what was asked (timm: no text tower)."""

    name: str
    where: str
    looks_for: str
    detect: Callable[[set[str]], bool]
    read_vision: Reader
    read_siglip: Reader
    write_vision: Writer | None = None  # (config, state dict, out_dir) -> out_dir
    write_siglip: Writer | None = None  # (config, state dict, out_dir, *, allow_gelu_change) -> out_dir
    config_files: tuple[str, ...] = ()  # JSON files beside the weights that ``read_*`` need
    non_vision_prefixes: tuple[str, ...] = ()  # keys never read when loading an image tower
    # the tensors of ``path`` when it is (or a folder holds only) this layout's own container, else None;
    # ``vision_only`` may drop everything but the image tower
    open_weights: Callable[[Path, bool], dict[str, Tensor] | None] | None = None

    @property
    def writable(self) -> bool:
        return self.write_vision is not None or self.write_siglip is not None


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Register ``fmt`` under its name (detection tries formats in registration order)."""
    if fmt.name in _FORMATS:
        raise ValueError(f"checkpoint format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def list_formats(*, writable: bool = False) -> tuple[str, ...]:
    """The registered format names in detection order (only those that can be written if ``writable``)."""
    return tuple(name for name, fmt in _FORMATS.items() if fmt.writable or not writable)


def get_format(name: str, *, writable: bool = False) -> Format:
    """The format ``name``; an unknown one (or one that cannot be written, if ``writable``) lists the known
    ones."""
    fmt = _FORMATS.get(name)
    if fmt is None or (writable and not fmt.writable):
        raise ValueError(
            f"unknown checkpoint format {name!r}; choose one of {list_formats(writable=writable)}"
        )
    return fmt


def detect_format(keys: Iterable[str], source: str) -> Format:
    """The format ``keys`` are in; otherwise an error naming the formats tried and the first keys."""
    keys = list(keys)
    found = set(keys)
    for fmt in _FORMATS.values():
        if fmt.detect(found):
            return fmt
    tried = "; ".join(f"{fmt.name} ({fmt.looks_for})" for fmt in _FORMATS.values())
    raise CheckpointError(
        f"{source} is in no SigLIP checkpoint layout this package reads. Tried: {tried}. "
        f"Its first keys ({len(keys)} in all): {keys[:12]}"
    )


def with_source(make, *args, **kwargs):
    """Config builders raise ValueError/KeyError naming the problem; re-raise as CheckpointError."""
    try:
        return make(*args, **kwargs)
    except (ValueError, KeyError) as err:
        raise CheckpointError(str(err.args[0] if isinstance(err, KeyError) else err)) from err
