"""Batch patch-feature extraction from image files, with skipping of unreadable images."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import save_safetensors
from .hardware import Precision, choose_precision, compile_support
from .images import ImageLoadError, load_image
from .naflex import NaFlexVisionTower
from .naflex_processor import NaFlexImageProcessor
from .processor import ImageProcessor
from .vision import TowerOutput, VisionTower

AnyTower = VisionTower | NaFlexVisionTower
AnyProcessor = ImageProcessor | NaFlexImageProcessor

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
    """Stacked outputs for the images that could be read; ``skipped`` maps file -> reason.

    ``grids`` holds each image's (h, w) token grid. A fixed-resolution tower gives every image the
    same grid; a NaFlex tower gives each its own, its h*w tokens first in its row of
    ``patch_features`` and zero padding after them (``attention_mask`` marks the real ones)."""

    files: list[str]
    patch_features: torch.Tensor  # (N_images, N_tokens, D)
    grids: list[tuple[int, int]]
    pooled: torch.Tensor | None  # (N_images, D)
    skipped: dict[str, str] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None  # (N_images, N_tokens), NaFlex only

    @property
    def grid(self) -> tuple[int, int] | None:
        """The grid all images share, or None when they differ (NaFlex)."""
        return self.grids[0] if len(set(self.grids)) == 1 else None

    def per_image(self) -> list[torch.Tensor]:
        """Each image's real tokens, (h*w, D)."""
        return [f[: h * w] for f, (h, w) in zip(self.patch_features, self.grids)]

    def save(self, out: str | os.PathLike, **extra_metadata: str) -> Path:
        """Write a safetensors file; file names, grids and skips go into its metadata (JSON strings).

        NaFlex features add ``attention_mask`` (N_images, N_tokens) and ``spatial_shapes`` (N_images, 2)."""
        tensors = {"patch_features": self.patch_features.contiguous()}
        if self.pooled is not None:
            tensors["pooled"] = self.pooled.contiguous()
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask.contiguous()
            tensors["spatial_shapes"] = torch.tensor(self.grids, dtype=torch.long)
        meta = {
            "files": json.dumps(self.files),
            "grids": json.dumps([list(g) for g in self.grids]),
            "skipped": json.dumps(self.skipped),
            **extra_metadata,
        }
        if self.grid is not None and self.attention_mask is None:
            meta["grid"] = json.dumps(list(self.grid))
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, out, metadata=meta)
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


@dataclass
class _Batch:
    """One batch of files read and preprocessed: the files kept, those skipped (file: reason), and the
    processor's output for the kept images (None when none could be read)."""

    kept: list[str]
    skipped: dict[str, str]
    inputs: Any = None


def _read_batch(processor: AnyProcessor, files: list[Path]) -> _Batch:
    """Decode and preprocess ``files`` (what runs beside the tower, one batch ahead)."""
    batch = _Batch([], {})
    images = []
    for f in files:
        try:
            images.append(load_image(f))
            batch.kept.append(str(f))
        except ImageLoadError as err:
            batch.skipped[str(f)] = err.reason
    if images:
        batch.inputs = processor(images)
    return batch


def _run(tower: AnyTower, run, batch: _Batch, device, dtype):
    """One read batch through the tower (``run``: it, or its compiled form): (features, grids, pooled,
    mask)."""
    if isinstance(tower, NaFlexVisionTower):
        inputs = batch.inputs
        out = tower(
            inputs.pixel_values.to(device=device, dtype=dtype), inputs.spatial_shapes, inputs.attention_mask
        )
        return out.patch_features, out.grids, out.pooled, inputs.attention_mask
    out = run(batch.inputs.to(device=device, dtype=dtype))  # (b, 3, H, W) in
    return out.patch_features, [out.grid] * len(batch.kept), out.pooled, None


@torch.no_grad()
def extract_features(
    tower: AnyTower,
    files: list[Path],
    *,
    processor: AnyProcessor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    compile: bool = False,
) -> Features:
    """Run ``tower`` over image files in batches; unreadable images are skipped and listed.

    ``compile=True`` runs a fixed-resolution tower under ``torch.compile`` (see :func:`compiled_tower`);
    NaFlex towers (a new shape per batch) run eagerly."""
    if processor is None:
        naflex = isinstance(tower, NaFlexVisionTower)
        processor = (
            NaFlexImageProcessor(patch_size=tower.config.patch_size, max_num_patches=tower.config.num_patches)
            if naflex
            else ImageProcessor(image_size=tower.config.image_size)
        )
    if isinstance(tower, NaFlexVisionTower) and not isinstance(processor, NaFlexImageProcessor):
        raise TypeError("a NaFlex tower needs a NaFlexImageProcessor")
    param = next(tower.parameters())
    run = compiled_tower(tower, batch_size) if compile and isinstance(tower, VisionTower) else tower
    kept: list[str] = []
    skipped: dict[str, str] = {}
    feats, pooled, grids, masks = [], [], [], []
    chunks = [files[start : start + batch_size] for start in range(0, len(files), batch_size)]
    bar = tqdm(total=len(files), unit="img", desc="extract", disable=not progress)
    # one thread reads and preprocesses the next batch while the tower runs on this one (PIL and torch
    # release the GIL), so the tower does not wait for decoding; a read error still surfaces here
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-read") as reader:
        ahead = reader.submit(_read_batch, processor, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            batch = ahead.result()
            if i + 1 < len(chunks):
                ahead = reader.submit(_read_batch, processor, chunks[i + 1])
            kept += batch.kept
            skipped.update(batch.skipped)
            if batch.inputs is not None:
                f_, g_, p_, m_ = _run(tower, run, batch, param.device, param.dtype)
                feats.append(f_.float().cpu())
                grids += g_
                if p_ is not None:
                    pooled.append(p_.float().cpu())
                if m_ is not None:
                    masks.append(m_)
            bar.update(len(chunk))
    bar.close()
    if not kept:
        raise ValueError(f"none of the {len(files)} images could be read: {skipped}")
    return Features(
        kept,
        torch.cat(feats),
        grids,
        torch.cat(pooled) if pooled else None,
        skipped,
        torch.cat(masks) if masks else None,
    )


def extract_to_file(
    model: str,
    images: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_size: int | None = None,
    max_num_patches: int | None = None,
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

    ``image_size`` resizes a fixed-resolution tower; ``max_num_patches`` sets a NaFlex tower's budget.
    ``dtype="auto"`` picks bf16 on CUDA and on CPUs with native bf16 matmul, fp32 elsewhere (see
    :func:`vision_tower.hardware.choose_precision`); ``compile=None`` compiles the tower when there are at
    least ``COMPILE_MIN_BATCHES`` batches and a compiler is available. ``log`` receives a line saying
    which precision and whether compiled, and why, before any work; both go into the file's metadata.
    """
    from .sources import load_tower, processor_for_tower

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = list(iter_image_files(images))
    if not files:
        raise FileNotFoundError(f"no image files found in {[str(i) for i in images]}")
    precision = choose_precision(dtype, device)
    if log is not None:
        log(precision.describe())
    tower = load_tower(
        model,
        image_size=image_size,
        feature_layer=feature_layer,
        use_head=use_head,
        device=device,
        dtype=precision.dtype,
    ).eval()
    if isinstance(tower, NaFlexVisionTower):
        compile, why = False, "NaFlex tower: every batch has its own shape"
    else:
        compile, why = decide_compile(compile, -(-len(files) // batch_size), device)
    if log is not None:
        log(f"compile: {'on' if compile else 'off'} ({why})")
    processor = processor_for_tower(model, tower, max_num_patches=max_num_patches)
    feats = extract_features(
        tower, files, processor=processor, batch_size=batch_size, progress=progress, compile=compile
    )
    feats.save(
        out,
        model=str(model),
        feature_layer=str(feature_layer),
        compiled=json.dumps(compile),
        **precision.metadata(),
    )
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
