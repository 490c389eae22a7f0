"""The two preprocessing numerics of transformers' image processors, with Pillow, numpy and torch only.

``"pil"`` is transformers' PIL backend (``*ImageProcessorPil``): Pillow resizes 8-bit RGB, the
result is rescaled in float64, cast to float32 and normalized in float32. ``"torchvision"`` is the
torchvision backend (transformers 5's default ``*ImageProcessor``): ``torchvision.transforms.v2``
resizes the uint8 (C, H, W) tensor with antialiasing, then rescale and normalize are fused into one
``(x - mean/r) / (std/r)`` in float32. torchvision's resize is ``torch.nn.functional.interpolate``
on uint8 where torch has a native uint8 kernel (bicubic; bilinear on AVX2/AVX-512/ARM CPUs), and
float32 plus rounding elsewhere; :func:`resize_uint8` makes the same calls, so both backends here
are bit-identical to transformers' on the CPU (torchvision itself is not needed).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import (
    DEFAULT,
    DefaultLimit,
    ImageLoadError,
    check_pixels,
    describe_source,
    load_image,
    pixel_limit,
)

BACKENDS = ("torchvision", "pil")
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
# torch's uint8 lanczos is what torchvision >= 0.27 runs for InterpolationMode.LANCZOS (Idefics3's filter)
_TORCH_MODES = {
    "nearest": "nearest-exact",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "lanczos": "lanczos",
}


@functools.lru_cache(maxsize=1)
def default_backend() -> str:
    """The backend transformers' ``AutoImageProcessor`` picks when none is asked for, in the installed
    transformers: 5.x takes torchvision when it is installed, Pillow otherwise; 4.x defaults to the
    Pillow processors. Without transformers: ``"torchvision"`` (5.x's default numerics)."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return "torchvision"
    if major < 5:
        return "pil"
    return "torchvision" if importlib.util.find_spec("torchvision") is not None else "pil"


def check_backend(backend: str | None) -> str:
    """``None`` -> :func:`default_backend`; an unknown name is an error listing the known ones."""
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS} (or None for the default)")
    return backend


def resample_code(resample: str | int) -> int:
    """Pillow filter number from a name ('bicubic') or a number (3)."""
    names = {v: k for k, v in RESAMPLE.items()}
    if isinstance(resample, str) and resample.lower() in RESAMPLE:
        return RESAMPLE[resample.lower()]
    if isinstance(resample, int) and resample in names:
        return int(resample)
    raise ValueError(f"unknown resample {resample!r}; known: {sorted(RESAMPLE)} or 0..5")


def resample_name(resample: str | int) -> str:
    return {v: k for k, v in RESAMPLE.items()}[resample_code(resample)]


# ----------------------------------------------------------------------------- inputs to uint8 RGB
def rgb_array(
    image: Any, *, backend: str, do_convert_rgb: bool = True, max_pixels: int | None | DefaultLimit = DEFAULT
) -> np.ndarray:
    """Any accepted input -> (H, W, 3) uint8 RGB, converted as transformers' ``backend`` converts it.

    PIL images (alpha composited onto white; no EXIF rotation for in-memory images), paths and bytes
    (decoded with :func:`load_image`, EXIF orientation applied), uint8 numpy (H, W[, C]) and torch
    (C, H, W) / (H, W) arrays with C in {1, 3, 4}."""
    if isinstance(image, Image.Image):
        if not do_convert_rgb and image.mode != "RGB":
            raise ImageLoadError(
                describe_source(image), f"mode {image.mode} with do_convert_rgb=False; expected RGB"
            )
        return np.array(load_image(image, max_pixels=max_pixels, exif_transpose=False))
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return np.array(load_image(image, max_pixels=max_pixels))
    if isinstance(image, torch.Tensor):
        return _array_rgb(_tensor_to_hwc(image), backend, do_convert_rgb, max_pixels)
    if isinstance(image, np.ndarray):
        return _array_rgb(image, backend, do_convert_rgb, max_pixels)
    raise TypeError(
        f"unsupported image type {type(image).__name__}; pass a PIL image, a path, bytes, "
        "a uint8 numpy (H, W, C) array or a uint8 torch (C, H, W) tensor"
    )


def _array_rgb(array: np.ndarray, backend: str, do_convert_rgb: bool, max_pixels) -> np.ndarray:
    """uint8 (H, W[, C]) -> (H, W, 3), compositing alpha the way ``backend`` does."""
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
    check_pixels((width, height), pixel_limit(max_pixels), f"<array {height}x{width}x{channels}>")
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if channels == 3:
        return np.ascontiguousarray(array)
    if not do_convert_rgb:
        raise ValueError("4-channel array with do_convert_rgb=False; the tower needs 3 channels")
    if backend == "pil":  # transformers' convert_to_rgb on arrays: float64, rounded
        alpha = array[:, :, 3:4] / 255.0
        return np.round(alpha * array[:, :, :3] + (1 - alpha) * 255.0).astype(np.uint8)
    x = (
        torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).mul_(1.0 / 255)
    )  # torchvision to_dtype
    rgb = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    return rgb.mul(255 + 1.0 - 1e-3).to(torch.uint8).numpy()  # to_dtype(uint8, scale=True) truncates


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) or (H, W) tensor -> (H, W, C) numpy array."""
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


# ----------------------------------------------------------------------------- resize, rescale, normalize
def _native_uint8(resample: str) -> bool:
    """Where torchvision resizes uint8 directly (else: float32, interpolate, round)."""
    if resample == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64",
            "arm64",
        )
    return True  # bicubic, lanczos and nearest


@functools.lru_cache(maxsize=1)
def _torch_has_lanczos() -> bool:
    """Whether this torch's ``interpolate`` has ``mode="lanczos"`` (what torchvision >= 0.27 resizes with)."""
    try:
        F.interpolate(torch.zeros(1, 1, 2, 2), size=[1, 1], mode="lanczos", antialias=True)
    except (NotImplementedError, ValueError, RuntimeError):
        return False
    return True


def resize_uint8(image: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """(C, H, W) uint8 CPU tensor -> (C, h, w) uint8, as ``torchvision.transforms.v2.functional.resize``."""
    if resample not in _TORCH_MODES:
        raise ValueError(
            f"resample {resample!r} has no torchvision-backend equivalent here; use backend='pil' "
            f"or one of {sorted(_TORCH_MODES)}"
        )
    if resample == "lanczos" and not _torch_has_lanczos():
        raise ValueError(
            f"resample 'lanczos' with backend='torchvision' needs torch's lanczos interpolate, which torch "
            f"{torch.__version__} lacks (transformers falls back to bicubic there): upgrade torch or use "
            "backend='pil'"
        )
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    smooth = resample != "nearest"
    kwargs = dict(mode=_TORCH_MODES[resample], align_corners=False if smooth else None, antialias=smooth)
    x = image[None]  # (1, C, H, W)
    if _native_uint8(resample):
        return F.interpolate(x, size=list(size), **kwargs)[0]
    y = F.interpolate(x.to(torch.float32), size=list(size), **kwargs)
    return y.round_().to(torch.uint8)[0]


@dataclass(frozen=True)
class PixelSteps:
    """What turns decoded RGB into model input: ``size`` (h, w) to resize to (None: kept), the filter,
    ``rescale_factor`` (None: no rescale) and per-channel ``mean``/``std`` (None: no normalize)."""

    size: tuple[int, int] | None
    resample: str
    rescale_factor: float | None
    mean: Sequence[float] | None
    std: Sequence[float] | None


def pixels(backend: str, rgb: np.ndarray, steps: PixelSteps) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) float32 with the numerics of transformers' ``backend``: torchvision
    (uint8 resize, rescale fused into the normalize) or PIL (PIL resize, rescale in float64)."""
    return (_torchvision_pixels if backend == "torchvision" else _pil_pixels)(rgb, steps)


def _torchvision_pixels(rgb: np.ndarray, s: PixelSteps) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W) uint8
    if s.size is not None:
        x = resize_uint8(x, s.size, s.resample)
    if s.mean is not None:
        mean_t, std_t = torch.tensor(list(s.mean)), torch.tensor(list(s.std))
        if s.rescale_factor is not None:  # fused, as transformers' TorchvisionBackend
            mean_t, std_t = mean_t * (1.0 / s.rescale_factor), std_t * (1.0 / s.rescale_factor)
        return x.to(torch.float32).sub_(mean_t.view(-1, 1, 1)).div_(std_t.view(-1, 1, 1))
    if s.rescale_factor is not None:
        return x * s.rescale_factor
    return x.to(torch.float32)


def _pil_pixels(rgb: np.ndarray, s: PixelSteps) -> torch.Tensor:
    if s.size is not None:
        height, width = s.size
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), resample=resample_code(s.resample)))
    values = rgb.astype(np.float64) * s.rescale_factor if s.rescale_factor is not None else rgb
    values = values.astype(np.float32)
    if s.mean is not None:
        values = (values - np.asarray(s.mean, dtype=np.float32)) / np.asarray(s.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1)
