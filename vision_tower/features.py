"""Batch patch-feature extraction from image files, with skipping of unreadable images."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .hardware import Precision, choose_precision, compile_support
from .images import ImageLoadError, load_image
from .processor import ImageProcessor
from .vision import TowerOutput, VisionTower

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# compile="auto" compiles from this many batches on: compiling a B/16 tower takes ~30-60 s on 2 CPU cores
# (a few seconds once inductor's on-disk cache holds it) and saves a third or more of each batch's time.
COMPILE_MIN_BATCHES = 32


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


def compiled_tower(tower: VisionTower, batch_size: int) -> Callable[[torch.Tensor], TowerOutput]:
    """``tower`` under ``torch.compile(fullgraph=True)`` for batches of ``batch_size``: a shorter batch is
    padded with zero images and its outputs cut back, so that one compiled graph serves every batch."""
    run = torch.compile(tower, fullgraph=True, dynamic=False)

    def call(pixels: torch.Tensor) -> TowerOutput:
        b = pixels.shape[0]
        if b < batch_size:
            pixels = torch.cat([pixels, pixels.new_zeros(batch_size - b, *pixels.shape[1:])])
        out = run(pixels)
        pooled = None if out.pooled is None else out.pooled[:b]
        return out._replace(patch_features=out.patch_features[:b], pooled=pooled)

    return call


@torch.no_grad()
def extract_features(
    tower: VisionTower,
    files: list[Path],
    *,
    processor: ImageProcessor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    compile: bool = False,
) -> Features:
    """Run ``tower`` over image files in batches; unreadable images are skipped and listed.

    ``compile=True`` runs it under ``torch.compile`` (see :func:`compiled_tower`)."""
    processor = processor or ImageProcessor(image_size=tower.config.image_size)
    param = next(tower.parameters())
    run = compiled_tower(tower, batch_size) if compile else tower
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
            out = run(pixels)
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
    dtype: str | torch.dtype | Precision | None = "auto",
    compile: bool | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Features:
    """Load ``model`` (folder, file, hub id or ``preset:NAME``), run it over the image files and folders in
    ``images`` with the checkpoint's own preprocessing, and save the features to ``out`` (safetensors).

    ``dtype="auto"`` picks bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere (see
    :func:`vision_tower.hardware.choose_precision`); ``compile=None`` compiles the tower when there are at
    least ``COMPILE_MIN_BATCHES`` batches and a compiler is available. ``log`` receives a line saying
    which precision and whether compiled, and why, before any work; both go into the file's metadata.
    """
    from .sources import load_tower, processor_for

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = list(iter_image_files(images))
    if not files:
        raise FileNotFoundError(f"no image files found in {[str(i) for i in images]}")
    precision = choose_precision(dtype, device)
    compile, why = decide_compile(compile, -(-len(files) // batch_size), device)
    if log is not None:
        log(precision.describe())
        log(f"compile: {'on' if compile else 'off'} ({why})")
    tower = load_tower(
        model,
        image_size=image_size,
        feature_layer=feature_layer,
        use_head=use_head,
        device=device,
        dtype=precision.dtype,
    ).eval()
    processor = processor_for(model, tower.config.image_size)
    feats = extract_features(
        tower, files, processor=processor, batch_size=batch_size, progress=progress, compile=compile
    )
    feats.save(out, model=str(model), feature_layer=str(feature_layer), compiled=json.dumps(compile),
               **precision.metadata())  # fmt: skip
    return feats


def decide_compile(requested: bool | None, n_batches: int, device: str | None = None) -> tuple[bool, str]:
    """(compile or not, why): as ``requested`` when given, else from ``COMPILE_MIN_BATCHES`` batches on
    when ``torch.compile`` can build code for ``device``."""
    if requested is not None:
        return requested, "requested"
    if n_batches < COMPILE_MIN_BATCHES:
        return False, f"auto: {n_batches} batch(es), compiling pays from {COMPILE_MIN_BATCHES}"
    ok, why = compile_support(device)
    return ok, f"auto: {n_batches} batches, {why}"
