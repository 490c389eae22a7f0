"""Synthetic "coloured shapes" image-text data for the demo and the tests.

`make_shapes` writes WebDataset tar shards of small images, each one shape of one
colour at a random size and position, upright with a small random tilt, on a noisy background, with a caption
drawn from varied templates ("a red circle", "a photo of a small red circle", ...);
plus held-out validation shards and an ImageFolder-style class folder for zero-shot
evaluation. A tiny SigLIP learns these classes in minutes on a CPU. Everything is a
pure function of the seed: the same call writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 205),
    "cyan": (40, 215, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {color} {shape}",
    "a {size} {color} {shape}",
    "a photo of a {color} {shape}",
    "a photo of a {size} {color} {shape}",
    "a picture of a {color} {shape}",
    "an image of a {size} {color} {shape}",
    "a drawing of a {color} {shape}",
    "{color} {shape}",
    "a {color} {shape} on a noisy background",
    "there is a {color} {shape} in the picture",
)
# Zero-shot prompts: "{}" is replaced by a class name such as "red circle".
ZEROSHOT_TEMPLATES: tuple[str, ...] = ("a {}", "a photo of a {}", "a drawing of a {}", "an image of a {}")

_SPLIT_IDS = {"train": 0, "val": 1, "zeroshot": 2}
# Shapes fill most of the image and stand upright (square axis-aligned, triangle and star point up)
# with a tilt of at most MAX_TILT: a tiny ViT then tells the four shapes apart within the demo's
# few hundred steps (with any rotation and smaller shapes it stays near 40% zero-shot top-1).
RADIUS_RANGE = (0.36, 0.48)  # circumradius as a share of the image side
MAX_TILT = 0.1 * math.pi
_UPRIGHT = {"square": math.pi / 4, "triangle": -math.pi / 2, "star": -math.pi / 2}
_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}


@dataclass
class ShapeSample:
    """One drawn sample: the image, its caption and its labels."""

    image: Image.Image
    caption: str
    color: str
    shape: str
    size: str

    @property
    def class_name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class ShapesSummary:
    """What `make_shapes` wrote; `train`/`val` are brace patterns for the data pipeline."""

    out_dir: str
    train: str
    val: str
    zeroshot: str
    n_train: int
    n_val: int
    n_zeroshot: int
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a square/triangle/star of circumradius `r` rotated by `angle` (radians)."""
    if shape == "square":
        radii, n = [r], 4
    elif shape == "triangle":
        radii, n = [r], 3
    elif shape == "star":
        radii, n = [r, 0.45 * r], 10
    else:
        raise ValueError(f"no polygon for shape {shape!r}; known: {SHAPES}")
    return [
        (
            cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
            cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n),
        )
        for i in range(n)
    ]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    scale = rng.uniform(0.85, 1.0)
    return tuple(int(np.clip(c * scale + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def draw_shape(color: str, shape: str, image_size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Draw one shape on a noisy, dim background; returns the image and its size word."""
    s = image_size
    low, high = RADIUS_RANGE
    r = rng.uniform(low, high) * s  # circumradius in pixels
    third = (high - low) / 3
    size = "small" if r < (low + third) * s else ("large" if r > (high - third) * s else "medium")
    cx, cy = rng.uniform(r, s - r, size=2)
    bg = tuple(int(v) for v in rng.integers(25, 100) + rng.integers(-20, 21, size=3))  # dim, low saturation
    img = Image.new("RGB", (s, s), bg)
    fill = _jitter(COLORS[color], rng, 20)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        angle = _UPRIGHT[shape] + rng.uniform(-MAX_TILT, MAX_TILT)
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    noise = rng.normal(0.0, rng.uniform(2.0, 6.0), size=(s, s, 3))  # (H, W, 3)
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), size


def make_sample(
    split: str, index: int, *, image_size: int = 64, seed: int = 0, class_index: int | None = None
) -> ShapeSample:
    """Sample `index` of `split`, a pure function of its arguments (class random unless given)."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    if class_index is None:
        class_index = int(rng.integers(len(CLASSES)))
    color, shape = CLASSES[class_index].split(" ")
    image, size = draw_shape(color, shape, image_size, rng)
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    caption = template.format(color=color, shape=shape, size=size)
    return ShapeSample(image=image, caption=caption, color=color, shape=shape, size=size)


def named_class(text: str) -> str | None:
    """The class a caption names ("a photo of a small red circle" -> "red circle"): its one colour word
    and its one shape word (repeats aside); None when it names no colour or shape, or more than one."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    colors, shapes = sorted(words & COLORS.keys()), sorted(words & set(SHAPES))
    return f"{colors[0]} {shapes[0]}" if len(colors) == 1 and len(shapes) == 1 else None


def same_class(generated: str, reference: str) -> bool:
    """Whether a generated caption names the reference caption's colour and shape (and no other);
    size and template words are not compared (the template is drawn at random, see CAPTION_TEMPLATES)."""
    named = named_class(generated)
    return named is not None and named == named_class(reference)


def _encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, _IMAGE_FORMATS[image_format], **({"quality": 92} if image_format == "jpg" else {}))
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file with fixed metadata so that the tar bytes depend only on the content."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_files(key: str, sample: ShapeSample, image_format: str) -> Iterator[tuple[str, bytes]]:
    meta = {
        "caption": sample.caption,
        "class": sample.class_name,
        "label": CLASSES.index(sample.class_name),
        "color": sample.color,
        "shape": sample.shape,
        "size": sample.size,
    }
    yield f"{key}.{image_format}", _encode(sample.image, image_format)
    yield f"{key}.txt", sample.caption.encode("utf-8")
    yield f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")


def write_shards(
    out_dir: Path,
    split: str,
    n: int,
    shard_size: int,
    *,
    image_size: int,
    seed: int,
    image_format: str = "png",
) -> str:
    """Write `n` samples of `split` as tar shards of `shard_size`; returns the brace pattern."""

    def files(index: int) -> Iterator[tuple[str, bytes]]:
        sample = make_sample(split, index, image_size=image_size, seed=seed)
        return _sample_files(f"{split}-{index:07d}", sample, image_format)

    return write_tar_shards(out_dir, f"shapes-{split}", n, shard_size, files)


def write_tar_shards(
    out_dir: Path, prefix: str, n: int, shard_size: int, files: Callable[[int], Iterable[tuple[str, bytes]]]
) -> str:
    """Write samples 0..n-1 as tar shards ``{prefix}-NNNNNN.tar`` of ``shard_size`` samples, sample ``i``
    being the (member name, bytes) pairs ``files(i)``; returns the brace pattern of the shards."""
    if n < 1 or shard_size < 1:
        raise ValueError(f"{prefix}: need n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    for shard in range(n_shards):
        with tarfile.open(out_dir / f"{prefix}-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
                for name, data in files(index):
                    _add_member(tar, name, data)
    return str(out_dir / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def folder_name(class_name: str) -> str:
    """Folder of a class in the ImageFolder layout ("red circle" -> "red_circle")."""
    return class_name.replace(" ", "_")


def write_class_folders(out_dir: Path, per_class: int, *, image_size: int, seed: int) -> int:
    """Write `per_class` held-out PNGs into `out_dir/<class folder>/`; returns the image count."""
    index = 0
    for class_index, name in enumerate(CLASSES):
        folder = out_dir / folder_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sample = make_sample("zeroshot", index, image_size=image_size, seed=seed, class_index=class_index)
            (folder / f"{i:05d}.png").write_bytes(_encode(sample.image, "png"))
            index += 1
    return index


# what make_shapes writes into its folder (and ``make-shapes --overwrite`` removes before writing again)
OUTPUTS = ("train", "val", "zeroshot", "classes.json", "classes.txt")


def make_shapes(
    out_dir: str | Path,
    *,
    n_train: int = 8192,
    n_val: int = 512,
    shard_size: int = 1024,
    image_size: int = 64,
    seed: int = 0,
    zeroshot_per_class: int = 20,
    image_format: str = "png",
) -> ShapesSummary:
    """Write the shapes dataset: `train/` and `val/` shards, `zeroshot/<class>/` images, `classes.json`."""
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r} unknown; choose one of {sorted(_IMAGE_FORMATS)}")
    start, out = time.perf_counter(), Path(out_dir)
    opts = {"image_size": image_size, "seed": seed}
    train = write_shards(out / "train", "train", n_train, shard_size, image_format=image_format, **opts)
    val = write_shards(out / "val", "val", n_val, shard_size, image_format=image_format, **opts)
    n_zs = write_class_folders(out / "zeroshot", zeroshot_per_class, **opts)
    info = {
        "classes": list(CLASSES),
        "folders": [folder_name(c) for c in CLASSES],
        "templates": list(ZEROSHOT_TEMPLATES),
        "image_size": image_size,
        "train": str(Path(train).relative_to(out)),
        "val": str(Path(val).relative_to(out)),
        "seed": seed,
    }
    (out / "classes.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return ShapesSummary(
        out_dir=str(out),
        train=train,
        val=val,
        zeroshot=str(out / "zeroshot"),
        n_train=n_train,
        n_val=n_val,
        n_zeroshot=n_zs,
        classes=list(CLASSES),
        templates=list(ZEROSHOT_TEMPLATES),
        seconds=time.perf_counter() - start,
    )
