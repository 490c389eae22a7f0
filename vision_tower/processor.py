"""Image preprocessing of SigLIP checkpoints, equal to transformers' ``SiglipImageProcessor``.

The recipe is a squash to a fixed square (no crop, aspect ratio not kept) with Pillow's
bicubic filter, then ``x * rescale_factor`` and ``(x - mean) / std``. The arithmetic follows
transformers' PIL backend (``SiglipImageProcessorPil``) step by step (rescale in float64,
cast to float32, normalize in float32), so the output is bit-identical to it in transformers 5.x
(the version the reference tests run against; transformers 4.x has no ``SiglipImageProcessorPil``
and its Pillow-based ``SiglipImageProcessor`` is not tested here). The default
torchvision backend of transformers 5 (``SiglipImageProcessor``) resizes with torchvision
instead of Pillow and differs from both by up to one 8-bit level (2/255 after
normalization) on a small fraction of pixels.

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

import numpy as np
import torch
from PIL import Image

from .hub import resolve
from .images import (
    DEFAULT,
    DefaultLimit,
    ImageLoadError,
    check_pixels,
    describe_source,
    load_image,
    pixel_limit,
)

CONFIG_NAME = "preprocessor_config.json"

RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in RESAMPLE.items()}

# transformers keys that carry no behaviour for this processor
_IGNORED_KEYS = {"image_processor_type", "processor_class", "feature_extractor_type", "default_to_square"}
_UNSUPPORTED_TYPES = {"Siglip2ImageProcessor", "Siglip2ImageProcessorFast", "Siglip2ImageProcessorPil"}


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``448`` -> ``(448, 448)``; ``(h, w)`` kept; anything else is an error."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size  # type: ignore[return-value]


def _resample_code(resample: str | int) -> int:
    """Pillow filter number from a name ('bicubic') or a number (3)."""
    if isinstance(resample, str) and resample.lower() in RESAMPLE:
        return RESAMPLE[resample.lower()]
    if isinstance(resample, int) and resample in _RESAMPLE_NAMES:
        return int(resample)
    raise ValueError(f"unknown resample {resample!r}; known: {sorted(RESAMPLE)} or 0..5")


def _triple(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    """Per-channel statistics: a scalar is repeated over the three channels."""
    vals = (float(values),) * 3 if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} needs 3 values (one per RGB channel), got {values!r}")
    return vals  # type: ignore[return-value]


@dataclasses.dataclass
class ImageProcessor:
    """SigLIP image preprocessing: bicubic squash to ``image_size``, rescale, normalize.

    ``ImageProcessor(image_size=448)`` builds one for a 448 px tower; ``from_pretrained``
    reads a checkpoint's ``preprocessor_config.json``. Calling it returns ``pixel_values``
    ``(B, 3, H, W)`` float32. ``max_pixels`` bounds decoded image size (see ``load_image``).
    """

    image_size: int | tuple[int, int] = 224
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resample: str | int = "bicubic"
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    max_pixels: int | None | DefaultLimit = DEFAULT

    def __post_init__(self) -> None:
        self.image_size = _pair(self.image_size)
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        self.resample = _RESAMPLE_NAMES[_resample_code(self.resample)]
        self.rescale_factor = float(self.rescale_factor)

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
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        arrays = [self._pixels(self._to_rgb_pil(image)) for image in batch]  # each (H, W, 3)
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)} with do_resize=False")
        stacked = torch.from_numpy(np.stack(arrays))  # (B, H, W, 3)
        return stacked.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)

    preprocess = __call__

    def _to_rgb_pil(self, image: Any) -> Image.Image:
        """Any accepted input -> decoded 3-channel PIL image."""
        if isinstance(image, Image.Image):
            if not self.do_convert_rgb:
                return _require_rgb(image)
            # no EXIF rotation for in-memory images, like transformers' processors
            return load_image(image, max_pixels=self.max_pixels, exif_transpose=False)
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(image, max_pixels=self.max_pixels)
        if isinstance(image, torch.Tensor):
            return self._array_to_pil(_tensor_to_hwc(image))
        if isinstance(image, np.ndarray):
            return self._array_to_pil(image)
        raise TypeError(
            f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, "
            "a uint8 numpy (H, W, C) array or a uint8 torch (C, H, W) tensor"
        )

    def _array_to_pil(self, array: np.ndarray) -> Image.Image:
        """uint8 ``(H, W[, C])`` array -> RGB PIL image, compositing alpha like transformers."""
        if array.dtype != np.uint8:
            raise TypeError(
                f"image arrays must be uint8 (0..255), got {array.dtype}; for floats in [0, 1] "
                "use (x * 255).round().astype(np.uint8)"
            )
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"image arrays must be (H, W) or (H, W, C) with C in 1, 3, 4; got {array.shape}")
        height, width, channels = array.shape
        check_pixels((width, height), pixel_limit(self.max_pixels), f"<array {height}x{width}x{channels}>")
        if channels == 1:
            array = np.repeat(array, 3, axis=2)
        elif channels == 4:
            if not self.do_convert_rgb:
                raise ValueError("4-channel array with do_convert_rgb=False; the tower needs 3 channels")
            alpha = array[:, :, 3:4] / 255.0  # float64, as transformers
            array = np.round(alpha * array[:, :, :3] + (1 - alpha) * 255.0).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(array))  # (H, W, 3) uint8 -> RGB

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """Resize, rescale and normalize one RGB image; returns float32 ``(H, W, 3)``."""
        if self.do_resize:
            height, width = self.size
            image = image.resize((width, height), resample=_resample_code(self.resample))
        pixels = np.asarray(image)  # (H, W, 3) uint8
        if self.do_rescale:
            values = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            values = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            values = (values - mean) / std
        return values

    # ------------------------------------------------------------------ config files
    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content, in transformers' SiglipImageProcessor fields."""
        height, width = self.size
        return {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.mean),
            "image_processor_type": "SiglipImageProcessor",
            "image_std": list(self.std),
            "resample": _resample_code(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": {"height": height, "width": width},
        }

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """Build from transformers' SiglipImageProcessor fields; ``overrides`` use this class's names."""
        kwargs = _kwargs_from_config(config)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(f"unknown ImageProcessor option(s) {unknown}; known: {sorted(fields)}")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> ImageProcessor:
        """Read ``preprocessor_config.json`` from a folder, the file itself, or a hub repo id."""
        path = resolve(src, revision=revision, cache_dir=cache_dir)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {str(path)!r}")
        with open(file, encoding="utf-8") as handle:
            config = json.load(handle)
        try:
            return cls.from_dict(config, **overrides)
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from err

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``preprocessor_config.json`` that transformers' SiglipImageProcessor loads."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file


def _kwargs_from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Map transformers' processor fields to ``ImageProcessor`` arguments, refusing what it cannot do."""
    kind = config.get("image_processor_type", "SiglipImageProcessor")
    if kind in _UNSUPPORTED_TYPES or "max_num_patches" in config:
        raise ValueError(
            f"{kind} (NaFlex, variable resolution) is not supported; use a fixed-resolution checkpoint"
        )
    if config.get("do_center_crop"):
        raise ValueError("do_center_crop=true is not part of the SigLIP recipe and is not supported")
    if config.get("do_pad"):
        raise ValueError("do_pad=true is not part of the SigLIP recipe and is not supported")
    kwargs: dict[str, Any] = {}
    if "size" in config:
        kwargs["image_size"] = _size_from_config(config["size"])
    names = {
        "image_mean": "mean",
        "image_std": "std",
        "resample": "resample",
        "rescale_factor": "rescale_factor",
    }
    for key, name in names.items():
        if config.get(key) is not None:
            kwargs[name] = config[key]
    for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
        if config.get(key) is not None:
            kwargs[key] = bool(config[key])
    return kwargs


def _size_from_config(size: Any) -> tuple[int, int]:
    """transformers ``size``: ``{"height", "width"}`` or an int; shortest-edge sizes are refused."""
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) and "height" in size and "width" in size:
        return (int(size["height"]), int(size["width"]))
    raise ValueError(f"size {size!r} is not a fixed {{height, width}}; SigLIP squashes to a fixed size")


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """uint8 ``(C, H, W)`` or ``(H, W)`` tensor -> ``(H, W, C)`` numpy array."""
    if tensor.dtype != torch.uint8:
        raise TypeError(
            f"image tensors must be uint8 (0..255), got {tensor.dtype}; for floats in [0, 1] "
            "use (x * 255).round().to(torch.uint8)"
        )
    array = tensor.detach().cpu().numpy()
    if array.ndim == 3:
        if array.shape[0] not in (1, 3, 4):
            raise ValueError(f"image tensors must be (C, H, W) with C in 1, 3, 4; got {tuple(tensor.shape)}")
        array = np.moveaxis(array, 0, -1)
    return array


def _require_rgb(image: Image.Image) -> Image.Image:
    """With ``do_convert_rgb=False`` only RGB images are accepted (the tower needs 3 channels)."""
    if image.mode != "RGB":
        raise ImageLoadError(
            describe_source(image), f"mode {image.mode} with do_convert_rgb=False; expected RGB"
        )
    return image


__all__ = ["ImageProcessor"]
