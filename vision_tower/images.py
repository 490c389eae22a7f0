"""Safe image loading shared by the image processor, the data pipeline and the command line.

``load_image`` turns a path, raw bytes, a binary file object or a PIL image into a decoded
RGB ``PIL.Image.Image``. Every failure (missing or unreadable file, unknown format,
truncated data, a decompression bomb, a mode that cannot become RGB) raises
``ImageLoadError``, which names the source and the reason, so a data pipeline can skip
and count bad samples with a single ``except ImageLoadError``.

RGB conversion follows transformers' ``convert_to_rgb`` (used by ``SiglipImageProcessor``):
an image with an alpha band or a ``transparency`` entry is composited onto white, every
other mode goes through ``Image.convert("RGB")``. One deliberate difference: 16-bit
grayscale (``I;16*``) is scaled to 8 bits instead of being clipped at 255 (which turns
nearly every 16-bit pixel white in Pillow's conversion).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Default pixel limit (width * height) for decoding. ``None`` disables the check.
# Matches Pillow's own threshold, but exceeding it is an error here, never a warning.
MAX_IMAGE_PIXELS: int | None = Image.MAX_IMAGE_PIXELS

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes] | Image.Image


class DefaultLimit:
    """Marker for "use the module-level MAX_IMAGE_PIXELS at call time"."""

    def __repr__(self) -> str:
        return "MAX_IMAGE_PIXELS"

    def __reduce__(self) -> str:  # unpickles to the module's single DEFAULT
        return "DEFAULT"


DEFAULT = DefaultLimit()


class ImageLoadError(ValueError):
    """An image could not be loaded; ``source`` names it and ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source}: {reason}")


def describe_source(obj: object) -> str:
    """Short human-readable name of an image source, for error messages and logs."""
    if isinstance(obj, (str, os.PathLike)):
        return repr(os.fspath(obj))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return f"<{len(obj)} bytes>"
    if isinstance(obj, Image.Image):
        name = getattr(obj, "filename", "") or ""
        return repr(name) if name else f"<PIL image mode={obj.mode} size={obj.size[0]}x{obj.size[1]}>"
    name = getattr(obj, "name", None)
    return repr(name) if isinstance(name, str) else f"<{type(obj).__name__}>"


def pixel_limit(max_pixels: int | None | DefaultLimit = DEFAULT) -> int | None:
    """The effective pixel limit: ``max_pixels``, or ``MAX_IMAGE_PIXELS`` read at call time."""
    return MAX_IMAGE_PIXELS if isinstance(max_pixels, DefaultLimit) else max_pixels


def check_pixels(size: tuple[int, int], max_pixels: int | None, source: str) -> None:
    """Raise ``ImageLoadError`` when ``width * height`` exceeds ``max_pixels``."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            source,
            f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb); raise max_pixels (or "
            "vision_tower.images.MAX_IMAGE_PIXELS) if the image is trusted",
        )


def open_image(obj: ImageSource, *, max_pixels: int | None | DefaultLimit = DEFAULT) -> Image.Image:
    """Open and fully decode ``obj`` (path, bytes or binary file) in its stored mode."""
    limit = pixel_limit(max_pixels)
    source = describe_source(obj)
    if isinstance(obj, str) and obj.startswith(("http://", "https://")):
        raise ImageLoadError(source, "URLs are not fetched; download the file and pass its path")
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if not path.is_file():
            raise ImageLoadError(source, "no such file" if not path.exists() else "not a regular file")
        try:
            with open(path, "rb") as handle:
                return _decode(handle, limit, source)
        except OSError as err:  # permission denied, I/O error while opening
            raise ImageLoadError(source, f"unreadable file ({err})") from err
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(obj)), limit, source)
    if hasattr(obj, "read"):
        return _decode(obj, limit, source)
    raise ImageLoadError(source, f"unsupported source type {type(obj).__name__}")


def _decode(handle: IO[bytes], limit: int | None, source: str) -> Image.Image:
    """Decode one image from an open binary handle, refusing bombs and truncated data."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; the limit is enforced below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            check_pixels(image.size, limit, source)
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageLoadError(source, f"decompression bomb refused by Pillow ({err})") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(source, "not a recognised image format (corrupt or not an image)") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, ImageLoadError):
            raise
        raise ImageLoadError(source, f"corrupt or truncated image data ({err})") from err
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB the way transformers' ``convert_to_rgb`` does.

    Alpha (an ``A`` band or a ``transparency`` entry) is composited onto white; ``I;16*``
    16-bit grayscale is scaled to 8 bits; everything else uses ``Image.convert("RGB")``.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16"):
        wide = np.asarray(image).astype(np.float64)  # (H, W) 0..65535
        image = Image.fromarray(np.round(wide * (255.0 / 65535.0)).astype(np.uint8))  # -> L
    elif image.mode == "La":  # premultiplied; Pillow converts it only to LA
        image = image.convert("LA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(
    obj: ImageSource,
    *,
    max_pixels: int | None | DefaultLimit = DEFAULT,
    exif_transpose: bool = True,
) -> Image.Image:
    """Load ``obj`` (path, bytes, binary file or PIL image) as a decoded RGB PIL image.

    ``max_pixels`` bounds ``width * height`` (default: ``MAX_IMAGE_PIXELS``; ``None`` disables
    it). ``exif_transpose`` applies the EXIF orientation tag, as transformers' ``load_image``
    does for files. Raises ``ImageLoadError`` on any failure.
    """
    source = describe_source(obj)
    if isinstance(obj, Image.Image):
        check_pixels(obj.size, pixel_limit(max_pixels), source)
        image = obj
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageLoadError(source, f"corrupt or truncated image data ({err})") from err
    else:
        image = open_image(obj, max_pixels=max_pixels)
    try:
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageLoadError(source, f"cannot convert mode {image.mode} to RGB ({err})") from err
