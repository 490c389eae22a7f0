"""Test images: photograph-like synthetic ones, and a real photograph shipped by a dependency."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_photo(height: int, width: int, seed: int = 0, quality: int | None = 90) -> Image.Image:
    """A photograph-like RGB image: smooth gradients, soft shapes, sensor noise, JPEG round trip."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width], dtype=np.float64)[:, None, None]
    base = np.stack(
        [
            120 + 100 * np.sin(3 * x + rng.uniform(0, 6)) * np.cos(2 * y),
            110 + 90 * np.cos(4 * y + rng.uniform(0, 6)),
            100 + 80 * np.sin(5 * (x + y) + rng.uniform(0, 6)),
        ],
        axis=-1,
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        box = [x0, y0, x0 + rng.uniform(5, width / 2), y0 + rng.uniform(5, height / 2)]
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image).astype(np.float64) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if quality is None:
        return image
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def shipped_photo() -> Path | None:
    """A real photograph shipped by a dependency (matplotlib's sample data), without importing it."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    return path if path.is_file() else None
