"""Batch patch-feature extraction from image files, with skipping of unreadable images."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .images import ImageLoadError, load_image
from .processor import ImageProcessor
from .vision import VisionTower

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def iter_image_files(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Files as given, and image files under folders (recursively, sorted)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")


@dataclass
class Features:
    """Stacked outputs for the images that could be read; ``skipped`` maps file -> reason."""

    files: list[str]
    patch_features: torch.Tensor  # (N_images, N_tokens, D)
    grid: tuple[int, int]
    pooled: torch.Tensor | None  # (N_images, D)
    skipped: dict[str, str] = field(default_factory=dict)

    def save(self, out: str | os.PathLike, **extra_metadata: str) -> Path:
        """Write a safetensors file; file names, grid and skips go into its metadata (JSON strings)."""
        tensors = {"patch_features": self.patch_features.contiguous()}
        if self.pooled is not None:
            tensors["pooled"] = self.pooled.contiguous()
        meta = {
            "files": json.dumps(self.files),
            "grid": json.dumps(list(self.grid)),
            "skipped": json.dumps(self.skipped),
            **extra_metadata,
        }
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, out, metadata=meta)
        return out


@torch.no_grad()
def extract_features(
    tower: VisionTower,
    files: list[Path],
    *,
    processor: ImageProcessor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Features:
    """Run ``tower`` over image files in batches; unreadable images are skipped and listed."""
    processor = processor or ImageProcessor(image_size=tower.config.image_size)
    param = next(tower.parameters())
    kept: list[str] = []
    skipped: dict[str, str] = {}
    feats, pooled, grid = [], [], (0, 0)
    bar = tqdm(total=len(files), unit="img", desc="extract", disable=not progress)
    for start in range(0, len(files), batch_size):
        images = []
        for f in files[start : start + batch_size]:
            try:
                images.append(load_image(f))
                kept.append(str(f))
            except ImageLoadError as err:
                skipped[str(f)] = err.reason
        if images:
            pixels = processor(images).to(device=param.device, dtype=param.dtype)  # (b, 3, H, W)
            out = tower(pixels)
            grid = out.grid
            feats.append(out.patch_features.float().cpu())
            if out.pooled is not None:
                pooled.append(out.pooled.float().cpu())
        bar.update(len(files[start : start + batch_size]))
    bar.close()
    if not kept:
        raise ValueError(f"none of the {len(files)} images could be read: {skipped}")
    return Features(kept, torch.cat(feats), grid, torch.cat(pooled) if pooled else None, skipped)


def extract_to_file(
    model: str,
    images: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layer: int = -1,
    use_head: bool | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Features:
    """Load ``model`` (folder, file, hub id or ``preset:NAME``), run it over the image files and folders in
    ``images`` with the checkpoint's own preprocessing, and save the features to ``out`` (safetensors)."""
    from .sources import load_tower, processor_for

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tower = load_tower(
        model,
        image_size=image_size,
        feature_layer=feature_layer,
        use_head=use_head,
        device=device,
        dtype=dtype,
    ).eval()
    files = list(iter_image_files(images))
    if not files:
        raise FileNotFoundError(f"no image files found in {[str(i) for i in images]}")
    processor = processor_for(model, tower.config.image_size)
    feats = extract_features(tower, files, processor=processor, batch_size=batch_size, progress=progress)
    feats.save(out, model=str(model), feature_layer=str(feature_layer))
    return feats
