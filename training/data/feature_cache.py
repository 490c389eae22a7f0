"""A feature cache: the patch features a frozen tower gives each sample of a shard set, computed once
(``vision-tower extract --shards ... --out DIR``) and read instead of the images while the tower does
not train (stage ``align``: ``data.feature_cache: DIR``).

Layout of ``DIR``: ``<shard>-<part>.safetensors`` files holding one ``(n_images, N, D)`` tensor per
sample, named by its key, at most ``FILE_SAMPLES`` samples a file, with a digest of each sample's image
bytes in the file's metadata; ``cache.json`` (written last) says what made them (a fingerprint of the
tower's weights, its feature layer, the image size and preprocessing), the token grid, and per shard its
files with their sizes, the shard's size and the samples whose image could not be used (with the reason,
so a run reading the cache skips and counts them as a run reading images).

A cache holds one crop per image, what the ``fixed`` image layout reads: a model with a tiled layout
(``anyres``) refuses it before training starts. A cache is refused by a model whose tower, feature layer,
resolution or preprocessing differ. A sample is
identified by its content: its features are given only to a sample whose image bytes have the digest
recorded with them (a shard whose images were swapped or replaced is refused, naming the sample), and
``cache.json`` and the size of every file it lists are checked when the cache is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from vision_tower import ImageProcessor, VisionTower
from vision_tower.checkpoint import save_safetensors

from .cache_index import AGAIN, INDEX, VERSION, read_index
from .shards import (
    ShardSpec,
    SkipCounter,
    SkipSample,
    default_decode_image,
    expand_shards,
    image_member,
    iter_tar_samples,
    read_image,
)
from .vlm import Images

DIGESTS = "image_blake2b"  # the metadata entry of each file: {key: digest of the sample's image bytes}
FILE_SAMPLES = 256  # samples per safetensors file
# what each identity field means, for the refusal
IDENTITY = {
    "tower": "tower weights (fingerprint)",
    "feature_layer": "feature layer",
    "image_size": "image size",
    "preprocessing": "preprocessing",
}


def tower_fingerprint(tower: VisionTower) -> str:
    """A digest of the tower's weights (names, shapes, values as float32): equal towers, equal digests.
    Take it before the tower is partitioned or cast."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tower.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def cache_identity(tower: VisionTower, processor: ImageProcessor) -> dict[str, Any]:
    """What must match between a cache and the model reading it."""
    return {
        "tower": tower_fingerprint(tower),
        "feature_layer": tower.feature_layer,
        "image_size": tower.config.image_size,
        "preprocessing": {**processor.to_dict(), "backend": processor.backend},
    }


def image_digest(sample: dict[str, Any]) -> str:
    """The digest of a raw sample's image bytes (the member features are computed from)."""
    return hashlib.blake2b(sample[image_member(sample)], digest_size=16).hexdigest()


def shard_name(url: str) -> str:
    """A shard's name in the cache: its file name without ``.tar``."""
    name = os.path.basename(str(url).rstrip("/"))
    return name[: -len(".tar")] if name.endswith(".tar") else name


# ----------------------------------------------------------------------------- writing


@dataclass
class CacheSummary:
    """What :func:`extract_shards` wrote."""

    out_dir: str
    shards: int
    samples: int
    skipped: dict[str, int]  # reason -> samples (or shards, for bad_shard)
    grid: tuple[int, int]
    dim: int
    seconds: float


class _ShardWriter:
    """Batches one shard's images through the tower and writes its files of features."""

    def __init__(self, tower, processor, out: Path, name: str, batch_size: int, file_samples: int) -> None:
        self.tower, self.processor, self.out, self.name = tower, processor, out, name
        self.batch_size, self.file_samples = batch_size, file_samples
        self.param = next(tower.parameters())
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.done: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}  # key -> image digest, of the samples in `pending` and `done`
        self.files: dict[str, int] = {}  # file name -> bytes
        self.keys: set[str] = set()
        self.grid: tuple[int, int] | None = None

    def add(self, key: str, pixels: torch.Tensor, digest: str) -> None:
        if key in self.keys:
            raise ValueError(f"shard {self.name} holds two samples with key {key!r}: keys must be unique")
        self.keys.add(key)
        self.digests[key] = digest
        self.pending.append((key, pixels))
        if len(self.pending) == self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if self.pending:
            pixels = torch.cat([p for _, p in self.pending]).to(self.param.device, self.param.dtype)
            out = self.tower(pixels)  # patch_features (b, N, D)
            self.grid = out.grid
            for i, (key, _) in enumerate(self.pending):
                feats = out.patch_features[i : i + 1].cpu()  # (1, N, D)
                self.done[key] = feats.clone(memory_format=torch.contiguous_format)
            self.pending = []
        if len(self.done) >= self.file_samples:
            self.write()

    def write(self) -> None:
        if self.done:
            name = f"{self.name}-{len(self.files):05d}.safetensors"
            digests = {key: self.digests.pop(key) for key in self.done}
            save_safetensors(self.done, self.out / name, metadata={DIGESTS: json.dumps(digests)})
            self.files[name] = (self.out / name).stat().st_size
            self.done = {}


def extract_shards(
    tower: VisionTower,
    processor: ImageProcessor,
    shards: ShardSpec,
    out_dir: str | os.PathLike,
    *,
    identity: dict[str, Any] | None = None,
    batch_size: int = 32,
    file_samples: int | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Run ``tower`` (on its device, in its dtype) over the images of every sample of ``shards`` and write
    the cache to ``out_dir``. ``identity`` (:func:`cache_identity`) defaults to the tower as given; pass
    the one taken before casting it to a lower precision. ``file_samples``: samples per file (default
    ``FILE_SAMPLES``)."""
    start = time.perf_counter()
    file_samples = file_samples or FILE_SAMPLES
    if not isinstance(tower, VisionTower):
        raise ValueError(f"a feature cache needs a fixed-resolution VisionTower, got {type(tower).__name__}")
    urls = expand_shards(shards)
    names = [shard_name(u) for u in urls]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"shards with the same file name {twice}: a cache names its shards by file name")
    identity = identity or cache_identity(tower, processor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # an interrupted extraction leaves no index
    index: dict[str, Any] = {"version": VERSION, "identity": identity, "shards": {}}
    tower = tower.eval()
    grid, skipped, samples = None, {}, 0
    bar = tqdm(total=len(urls), unit="shard", desc="extract", disable=not progress)
    for url, name in zip(urls, names):
        entry, shard_grid = _extract_shard(tower, processor, url, name, out, batch_size, file_samples)
        index["shards"][name] = entry
        grid = grid or shard_grid
        samples += entry["samples"]
        for reason in [*entry["skipped"].values(), *entry["problems"]]:
            skipped[reason] = skipped.get(reason, 0) + 1
        bar.update(1)
    bar.close()
    if grid is None:
        raise ValueError(f"no usable image in the shards {shards!r}: nothing to cache")
    probe = next(f for e in index["shards"].values() for f in e["files"])
    with safe_open(out / probe, framework="pt") as f:
        first = f.get_tensor(next(iter(f.keys())))  # (n, N, D)
    index.update(grid=list(grid), dim=int(first.shape[-1]), dtype=str(first.dtype).removeprefix("torch."))
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, out / INDEX)
    return CacheSummary(
        str(out), len(urls), samples, skipped, tuple(grid), index["dim"], time.perf_counter() - start
    )


def _extract_shard(tower, processor, url, name, out, batch_size, file_samples):
    counter = SkipCounter(max_consecutive=1 << 62)
    writer = _ShardWriter(tower, processor, out, name, batch_size, file_samples)
    skipped: dict[str, str] = {}
    for sample in iter_tar_samples(url, counter):
        key = sample["__key__"]
        try:
            image = read_image(sample, default_decode_image)
            try:
                pixels = processor(image)  # (1, 3, H, W)
            except Exception as exn:
                raise SkipSample("transform", repr(exn)) from exn
        except SkipSample as skip:
            skipped[key] = skip.reason
            continue
        writer.add(key, pixels, image_digest(sample))
    writer.flush()
    writer.write()
    entry = {
        "source": str(url),
        "bytes": os.path.getsize(url) if os.path.exists(url) else None,
        "files": writer.files,
        "samples": len(writer.keys),
        "skipped": skipped,
        "problems": dict(counter.counts),  # a truncated or unreadable shard
    }
    return entry, writer.grid


# ----------------------------------------------------------------------------- reading


class FeatureCache:
    """Reads a cache made by :func:`extract_shards`; ``load(sample)`` gives a raw sample's features
    ``(n, N, D)`` and grid in place of its images (the ``images`` of a
    :class:`~training.data.vlm.VLMBuilder`)."""

    batch_key = "patch_features"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.identity, self.shards = index["identity"], index["shards"]
        self.grid, self.dim = tuple(index["grid"]), int(index["dim"])
        self._keys: dict[str, dict[str, Any]] = {}  # shard -> key -> (open file, digest) (per worker)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_keys": {}}  # open files stay in the process that opened them

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a cache made with another tower, feature layer, resolution or preprocessing, naming each."""
        diff = [k for k in IDENTITY if self.identity.get(k) != identity.get(k)]
        if not diff:
            return
        shown = []
        for k in diff:
            mine, theirs = self.identity.get(k), identity.get(k)
            if k == "preprocessing":
                keys = sorted({*(mine or {}), *(theirs or {})})
                mine = {f: (mine or {}).get(f) for f in keys if (mine or {}).get(f) != (theirs or {}).get(f)}
                theirs = {f: (theirs or {}).get(f) for f in mine}
            shown.append(f"{IDENTITY[k]}: cache {mine}, model {theirs}")
        raise ValueError(
            f"feature cache {self.folder} was made with another "
            f"{' and '.join(k.replace('_', ' ') for k in diff)} "
            f"({'; '.join(shown)}): extract the features again with this model's tower, or drop "
            "data.feature_cache"
        )

    def check_shards(self, urls: list[str]) -> None:
        """Every shard of ``urls`` must be in the cache, unchanged in size."""
        missing = [u for u in urls if shard_name(u) not in self.shards]
        if missing:
            raise ValueError(
                f"feature cache {self.folder} has no features for {len(missing)} of the {len(urls)} shards, "
                f"e.g. {missing[0]}: extract them (vision-tower extract --shards ... --out DIR)"
            )
        for url in urls:
            saved = self.shards[shard_name(url)]["bytes"]
            if saved is not None and os.path.exists(url) and os.path.getsize(url) != saved:
                raise ValueError(
                    f"shard {url} has {os.path.getsize(url)} bytes, {saved} when the feature cache "
                    f"{self.folder} was made: extract it again"
                )

    def _open(self, name: str) -> dict[str, tuple[Any, str]]:
        """Key -> (open file, image digest) of the samples of shard ``name``."""
        files = {}
        for file in self.shards[name]["files"]:
            path = self.folder / file
            try:
                handle = safe_open(path, framework="pt")
                digests = json.loads((handle.metadata() or {})[DIGESTS])
            except Exception as err:  # safetensors' own error type, or metadata that is not ours
                what = " ".join(str(err).split()) or type(err).__name__
                raise ValueError(f"feature cache file {path} cannot be read ({what}): {AGAIN}") from None
            keys = set(handle.keys())
            if not isinstance(digests, dict) or set(digests) != keys:
                raise ValueError(
                    f"feature cache file {path}: its metadata {DIGESTS} does not list its samples"
                )
            files.update((key, (handle, digests[key])) for key in keys)
        return files

    def load(self, sample: dict[str, Any]) -> Images:
        """The sample's cached features ``(n, N, D)`` (one crop per image: the ``fixed`` layout), their grid,
        and the tower's size as each image's."""
        name, key = shard_name(sample["__url__"]), sample["__key__"]
        entry = self.shards.get(name)
        if entry is None:
            raise ValueError(f"feature cache {self.folder} has no shard {name} ({sample['__url__']})")
        if key in entry["skipped"]:
            raise SkipSample(entry["skipped"][key], "its image could not be used when the cache was made")
        files = self._keys.get(name)
        if files is None:
            files = self._keys[name] = self._open(name)
        if key not in files:
            raise ValueError(
                f"sample {key} of {sample['__url__']} is not in the feature cache {self.folder}: the shard "
                "changed since the cache was made; extract it again"
            )
        handle, digest = files[key]
        if image_digest(sample) != digest:
            raise ValueError(
                f"sample {key} of {sample['__url__']} has another image than the one the feature cache "
                f"{self.folder} holds features of (the shard changed since the cache was made): {AGAIN}"
            )
        features = handle.get_tensor(key)  # (n, N, D)
        side = int(self.identity["image_size"])
        return Images(features, self.grid, [(side, side)] * features.shape[0])


def extract_to_cache(
    model: str,
    shards: ShardSpec,
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layer: int = -1,
    batch_size: int = 32,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Load the tower of ``model`` (folder, file, hub id or ``preset:NAME``) with its own preprocessing,
    and cache its patch features of ``shards`` in ``out_dir`` (``vision-tower extract --shards``).
    ``dtype`` (or its name) runs the tower in that precision; None or ``"auto"``: as stored."""
    from vision_tower.sources import load_tower, processor_for_tower

    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tower = load_tower(model, image_size=image_size, feature_layer=feature_layer, use_head=False)
    if not isinstance(tower, VisionTower):
        raise ValueError(f"{model} is a NaFlex tower: a feature cache needs a fixed-resolution tower")
    processor = processor_for_tower(model, tower)
    identity = cache_identity(tower, processor)  # of the weights as stored, before any cast
    tower = tower.to(device=device, dtype=dtype)
    return extract_shards(
        tower, processor, shards, out_dir, identity=identity, batch_size=batch_size, progress=progress
    )
