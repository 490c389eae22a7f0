"""Image preprocessing of SigLIP checkpoints, equal to transformers' ``SiglipImageProcessor``.

The recipe is a squash to a fixed square (no crop, aspect ratio not kept) with a bicubic filter,
then ``x * rescale_factor`` and ``(x - mean) / std``. Two numerics, as in transformers
(:mod:`.backends`): ``backend="torchvision"`` is transformers 5's default ``SiglipImageProcessor``
(antialiased torch resize of the uint8 image, fused rescale-normalize in float32), ``backend="pil"``
is ``SiglipImageProcessorPil`` (Pillow resize, rescale in float64, normalize in float32). They
differ by one or two 8-bit levels on a small fraction of pixels; each is bit-identical to its
transformers 5.x counterpart on in-memory images (the version the reference tests run against). The default
is what ``AutoImageProcessor`` gives in
the installed transformers (:func:`.backends.default_backend`).

Accepted inputs, one image or a list/tuple of them:

- ``PIL.Image.Image`` of any mode (alpha composited onto white, as transformers does);
- a path (``str`` / ``os.PathLike``) or raw ``bytes``: decoded with ``load_image`` (EXIF
  orientation applied, pixel limit enforced);
- ``numpy.ndarray`` ``uint8`` in ``(H, W)`` or ``(H, W, C)`` layout, C in {1, 3, 4};
- ``torch.Tensor`` ``uint8`` in ``(H, W)`` or ``(C, H, W)`` layout (torchvision's layout),
  C in {1, 3, 4}.

Float arrays are refused: pass 8-bit pixels so that resizing matches the reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import backends
from .backends import resample_code, resample_name
from .checkpoint import read_json_object
from .hub import resolve
from .images import DEFAULT, DefaultLimit

CONFIG_NAME = "preprocessor_config.json"


# transformers' SigLIP 2 NaFlex processors (read by NaFlexImageProcessor)
NAFLEX_TYPES = ("Siglip2ImageProcessor", "Siglip2ImageProcessorFast", "Siglip2ImageProcessorPil")


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``448`` -> ``(448, 448)``; ``(h, w)`` kept; anything else is an error."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def triple(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    """Per-channel statistics: a scalar is repeated over the three channels."""
    vals = (float(values),) * 3 if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {values!r}")
    return vals  # type: ignore[return-value]


class ConfigFile:
    """``from_pretrained`` / ``save_pretrained`` for processors described by ``preprocessor_config.json``
    (the class gives ``from_dict`` and ``to_dict``)."""

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ):
        """Read ``preprocessor_config.json`` from a folder, the file itself, or a hub repo id;
        ``overrides`` use this class's field names."""
        file, config = read_config(src, revision=revision, cache_dir=cache_dir)
        try:
            return cls.from_dict(config, **overrides)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` (that transformers' image processors load)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file


@dataclasses.dataclass(kw_only=True)
class Preprocessing(ConfigFile):
    """What both image processors share: per-channel statistics, filter and switches (keyword fields, after
    each processor's own), decoding an image to RGB and resizing, rescaling and normalizing it with the
    backend's numerics."""

    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resample: str | int = "bicubic"
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True  # transformers' Siglip2 processors leave RGBA/L inputs unconverted
    max_pixels: int | None | DefaultLimit = DEFAULT
    backend: str | None = None  # "torchvision" or "pil"; None: what AutoImageProcessor picks here

    def _config_fields(self, kind: str, **own: Any) -> dict[str, Any]:
        """``preprocessor_config.json``: the shared fields in transformers' names, ``kind`` and ``own``."""
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.mean),
            "image_processor_type": kind,
            "image_std": list(self.std),
            "resample": resample_code(self.resample),
            "rescale_factor": self.rescale_factor,
            **own,
        }

    def _check_pixels(self) -> None:
        self.mean = triple(self.mean, "mean")
        self.std = triple(self.std, "std")

    def _check_filter(self) -> None:
        self.resample = resample_name(self.resample)
        self.rescale_factor = float(self.rescale_factor)

    @staticmethod
    def _batch(images: Any) -> list[Any]:
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        return batch

    def _rgb(self, image: Any):
        """One image -> (H, W, 3) uint8 array."""
        return backends.rgb_array(
            image, backend=self.backend, do_convert_rgb=self.do_convert_rgb, max_pixels=self.max_pixels
        )

    def _float_pixels(self, rgb: Any, size: tuple[int, int] | None) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, h, w) float32: resized to ``size`` (None: kept), rescaled, normalized."""
        steps = backends.PixelSteps(
            size,
            self.resample,
            self.rescale_factor if self.do_rescale else None,
            self.mean if self.do_normalize else None,
            self.std if self.do_normalize else None,
        )
        return backends.pixels(self.backend, rgb, steps)

    @classmethod
    def _with_overrides(cls, kwargs: dict[str, Any], overrides: dict[str, Any]):
        """``cls(**kwargs)`` with ``overrides`` (this class's field names; an unknown one is an error)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(fields)}")
        return cls(**{**kwargs, **overrides})


@dataclasses.dataclass
class ImageProcessor(Preprocessing):
    """SigLIP image preprocessing: bicubic squash to ``image_size``, rescale, normalize.

    ``ImageProcessor(image_size=448)`` builds one for a 448 px tower; ``from_pretrained``
    reads a checkpoint's ``preprocessor_config.json``. Calling it returns ``pixel_values``
    ``(B, 3, H, W)`` float32. ``max_pixels`` bounds decoded image size (see ``load_image``);
    ``backend`` picks transformers' torchvision or PIL numerics (module docstring).
    """

    image_size: int | tuple[int, int] = 224

    def __post_init__(self) -> None:
        self.backend = backends.check_backend(self.backend)
        self.image_size = _pair(self.image_size)
        self._check_pixels()
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        self._check_filter()

    @property
    def size(self) -> tuple[int, int]:
        """Output ``(height, width)``."""
        return self.image_size  # type: ignore[return-value]

    def with_image_size(self, image_size: int | tuple[int, int]) -> ImageProcessor:
        """Same statistics and filter, another output size (e.g. a tower resized to 448 px)."""
        return dataclasses.replace(self, image_size=image_size)

    # ------------------------------------------------------------------ processing
    def __call__(self, images: Any) -> torch.Tensor:
        """Preprocess one image or a list of images into ``(B, 3, H, W)`` float32."""
        out = [self._pixels(image) for image in self._batch(images)]  # each (3, H, W)
        shapes = {tuple(x.shape) for x in out}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)} with do_resize=False")
        return torch.stack(out).contiguous()  # (B, 3, H, W)

    preprocess = __call__

    def _pixels(self, image: Any) -> torch.Tensor:
        """One image -> (3, H, W) float32: RGB conversion, resize, rescale, normalize."""
        return self._float_pixels(self._rgb(image), self.size if self.do_resize else None)

    # ------------------------------------------------------------------ config files
    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content, in transformers' SiglipImageProcessor fields."""
        height, width = self.size
        return self._config_fields("SiglipImageProcessor", size={"height": height, "width": width})

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """Build from transformers' SiglipImageProcessor fields; ``overrides`` use this class's names."""
        return cls._with_overrides(_kwargs_from_config(config), overrides)


def _kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map transformers' processor fields to ``ImageProcessor`` arguments, refusing what it cannot do."""
    kind = config.get("image_processor_type", "SiglipImageProcessor")
    if kind in NAFLEX_TYPES or "max_num_patches" in config:
        raise ValueError(
            f"{kind} is SigLIP 2 NaFlex (variable resolution) preprocessing: load it with "
            f"vision_tower.NaFlexImageProcessor"
        )
    if config.get("do_center_crop"):
        raise ValueError("do_center_crop=true is not part of the SigLIP recipe and is not supported")
    if config.get("do_pad"):
        raise ValueError("do_pad=true is not part of the SigLIP recipe and is not supported")
    kwargs: dict[str, Any] = {}
    if "size" in config:
        kwargs["image_size"] = _size_from_config(config["size"])
    return {**kwargs, **common_kwargs(config)}


def common_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The statistics, filter and switches every transformers image processor config shares."""
    names = {
        "image_mean": "mean",
        "image_std": "std",
        "resample": "resample",
        "rescale_factor": "rescale_factor",
    }
    kwargs = {name: config[key] for key, name in names.items() if config.get(key) is not None}
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if config.get(key) is not None:
            kwargs[key] = bool(config[key])
    return kwargs


# the JSON type of each transformers image-processor field these processors read
CONFIG_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "image_processor_type": str,
    "image_mean": (float, list),
    "image_std": (float, list),
    "rescale_factor": float,
    "resample": (int, str),
    "size": (int, dict),
    "do_resize": bool,
    "do_rescale": bool,
    "do_normalize": bool,
    "do_convert_rgb": bool,
    "do_center_crop": bool,
    "do_pad": bool,
    "patch_size": int,
    "max_num_patches": int,
}


def read_config(
    src: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, dict[str, Any]]:
    """(file, parsed content) of ``preprocessor_config.json`` in a folder or hub repo, or the file itself."""
    path = resolve(src, revision=revision, cache_dir=cache_dir)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r}")
    return file, read_json_object(file, CONFIG_FIELD_TYPES)


def _size_from_config(size: Any) -> tuple[int, int]:
    """transformers ``size``: ``{"height", "width"}`` or an int; shortest-edge sizes are refused."""
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    raise ValueError(f"size {size!r} is not a fixed {{height, width}}; SigLIP squashes to a fixed size")


__all__ = ["ImageProcessor"]
