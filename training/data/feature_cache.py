"""A feature cache: the patch features a frozen tower gives each sample of a shard set, computed once
(``vision-tower extract --shards ... --out DIR``) and read instead of the images while the tower does
not train (stage ``align``: ``data.feature_cache: DIR``).

Layout of ``DIR``: ``<shard>-<part>.safetensors`` files holding one ``(crops, N, D)`` tensor per
sample, named by its key: the features of every crop the image layout cuts the sample's image into (one
for ``fixed``; a base image and tiles for ``anyres``...), at most ``FILE_SAMPLES`` samples a file, with a
digest of each sample's image bytes and its image's (height, width) (what picks its crops and decoder
tokens) in the file's metadata; ``cache.json`` (written last) says what made them (a fingerprint of the
tower's weights, its feature layer, the image size, preprocessing and image layout), the token grid, and
per shard its files with their sizes, the shard's size and the samples whose image could not be used (with
the reason, so a run reading the cache skips and counts them as a run reading images).

A cache is refused by a model whose tower, feature layer, resolution, preprocessing or image layout (name
and options) differ; a cache written before layouts were recorded holds ``fixed`` crops. A sample is
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

from connectors.layouts import CropShape, ImageLayout, build_layout
from vision_tower import ImageProcessor, VisionTower
from vision_tower.checkpoint import save_safetensors

from .cache_index import AGAIN, FIXED_LAYOUT, INDEX, VERSION, layout_identity, read_index
from .shards import (
    ShardSpec,
    SkipCounter,
    SkipSample,
    expand_shards,
    image_member,
    iter_tar_samples,
)
from .vlm import Images, PixelImages

DIGESTS = "image_blake2b"  # the metadata entry of each file: {key: digest of the sample's image bytes}
SIZES = "image_sizes"  # the metadata entry of each file: {key: [[height, width]] of the sample's image}
FILE_SAMPLES = 256  # samples per safetensors file
# what each identity field means, for the refusal
IDENTITY = {
    "tower": "tower weights (fingerprint)",
    "feature_layer": "feature layer",
    "image_size": "image size",
    "preprocessing": "preprocessing",
    "layout": "image layout",
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


def cache_identity(
    tower: VisionTower, processor: ImageProcessor, layout: ImageLayout | None = None
) -> dict[str, Any]:
    """What must match between a cache and the model reading it; ``layout`` None: ``fixed``."""
    return {
        "tower": tower_fingerprint(tower),
        "feature_layer": tower.feature_layer,
        "image_size": tower.config.image_size,
        "preprocessing": {**processor.to_dict(), "backend": processor.backend},
        "layout": FIXED_LAYOUT if layout is None else layout_identity(layout),
    }


def tower_layout(tower: VisionTower, name: str = "fixed", **options: Any) -> ImageLayout:
    """The image layout ``name`` cutting crops for ``tower``'s input size: the crops a VLM with this tower
    and layout cuts (they depend on the crop size and the options alone, not on the connector's tokens,
    which are counted here as the tower's own grid)."""
    side = tower.config.image_size
    grid = (side // tower.config.patch_size,) * 2
    return build_layout(name, CropShape((side, side), grid[0] * grid[1], grid), **options)


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
    crops: int  # what the tower saw: one a sample for the fixed layout, more for a tiled one
    skipped: dict[str, int]  # reason -> samples (or shards, for bad_shard)
    grid: tuple[int, int]
    dim: int
    seconds: float


class _ShardWriter:
    """Batches the crops of one shard's images through the tower (``batch_size`` crops at a time, across
    samples) and writes its files of features."""

    def __init__(self, tower, out: Path, name: str, batch_size: int, file_samples: int) -> None:
        self.tower, self.out, self.name = tower, out, name
        self.batch_size, self.file_samples = batch_size, file_samples
        self.param = next(tower.parameters())
        self.pending: list[tuple[str, torch.Tensor]] = []  # (key, its crops' pixels (n, 3, H, W))
        self.pending_crops = self.crops = 0
        self.done: dict[str, torch.Tensor] = {}
        # key -> image digest and image sizes, of the samples in `pending` and `done`
        self.digests: dict[str, str] = {}
        self.sizes: dict[str, list[list[int]]] = {}
        self.files: dict[str, int] = {}  # file name -> bytes
        self.keys: set[str] = set()
        self.grid: tuple[int, int] | None = None

    def add(self, key: str, images: Images, digest: str) -> None:
        if key in self.keys:
            raise ValueError(f"shard {self.name} holds two samples with key {key!r}: keys must be unique")
        self.keys.add(key)
        self.digests[key] = digest
        self.sizes[key] = [[int(h), int(w)] for h, w in images.sizes]
        self.pending.append((key, images.values))
        self.pending_crops += images.values.shape[0]
        self.crops += images.values.shape[0]
        if self.pending_crops >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if self.pending:
            pixels = torch.cat([p for _, p in self.pending])  # (crops, 3, H, W)
            feats = []
            for start in range(0, pixels.shape[0], self.batch_size):
                chunk = pixels[start : start + self.batch_size].to(self.param.device, self.param.dtype)
                out = self.tower(chunk)  # patch_features (b, N, D)
                self.grid = out.grid
                feats.append(out.patch_features.cpu())
            features = torch.cat(feats)  # (crops, N, D)
            start = 0
            for key, p in self.pending:
                mine = features[start : start + p.shape[0]]  # (n, N, D)
                self.done[key] = mine.clone(memory_format=torch.contiguous_format)
                start += p.shape[0]
            self.pending, self.pending_crops = [], 0
        if len(self.done) >= self.file_samples:
            self.write()

    def write(self) -> None:
        if self.done:
            name = f"{self.name}-{len(self.files):05d}.safetensors"
            digests = {key: self.digests.pop(key) for key in self.done}
            sizes = {key: self.sizes.pop(key) for key in self.done}
            metadata = {DIGESTS: json.dumps(digests), SIZES: json.dumps(sizes)}
            save_safetensors(self.done, self.out / name, metadata=metadata)
            self.files[name] = (self.out / name).stat().st_size
            self.done = {}


def extract_shards(
    tower: VisionTower,
    processor: ImageProcessor,
    shards: ShardSpec,
    out_dir: str | os.PathLike,
    *,
    layout: ImageLayout | None = None,
    identity: dict[str, Any] | None = None,
    batch_size: int = 32,
    file_samples: int | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Run ``tower`` (on its device, in its dtype) over the crops ``layout`` (an image layout for the
    tower's input size, e.g. the VLM's ``vlm.layout`` or :func:`tower_layout`; None: ``fixed``) cuts the
    image of every sample of ``shards`` into, ``batch_size`` crops at a time, and write the cache to
    ``out_dir``. ``identity`` (:func:`cache_identity`) defaults to the tower and layout as given; pass the
    one taken before casting the tower to a lower precision. ``file_samples``: samples per file (default
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
    layout = layout or tower_layout(tower)
    if identity is not None and identity.get("layout") != layout_identity(layout):
        raise ValueError(
            f"identity names the image layout {_show_layout(identity.get('layout'))}, the crops are cut by "
            f"{_show_layout(layout_identity(layout))}: take it with cache_identity(tower, processor, layout)"
        )
    identity = identity or cache_identity(tower, processor, layout)
    images = PixelImages(processor, layout, tower.config.patch_size)  # the crops training cuts
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # an interrupted extraction leaves no index
    index: dict[str, Any] = {"version": VERSION, "identity": identity, "shards": {}}
    tower = tower.eval()
    grid, skipped, samples, crops = None, {}, 0, 0
    bar = tqdm(total=len(urls), unit="shard", desc="extract", disable=not progress)
    for url, name in zip(urls, names):
        entry, shard_grid = _extract_shard(tower, images, url, name, out, batch_size, file_samples)
        index["shards"][name] = entry
        grid = grid or shard_grid
        samples += entry["samples"]
        crops += entry.pop("crops")
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
        str(out), len(urls), samples, crops, skipped, tuple(grid), index["dim"], time.perf_counter() - start
    )


def _extract_shard(tower, images: PixelImages, url, name, out, batch_size, file_samples):
    counter = SkipCounter(max_consecutive=1 << 62)
    writer = _ShardWriter(tower, out, name, batch_size, file_samples)
    skipped: dict[str, str] = {}
    for sample in iter_tar_samples(url, counter):
        key = sample["__key__"]
        try:
            crops = images.load(sample)  # (crops, 3, H, W) and the image's size, as training reads it
        except SkipSample as skip:
            skipped[key] = skip.reason
            continue
        writer.add(key, crops, image_digest(sample))
    writer.flush()
    writer.write()
    entry = {
        "source": str(url),
        "bytes": os.path.getsize(url) if os.path.exists(url) else None,
        "files": writer.files,
        "samples": len(writer.keys),
        "crops": writer.crops,
        "skipped": skipped,
        "problems": dict(counter.counts),  # a truncated or unreadable shard
    }
    return entry, writer.grid


# ----------------------------------------------------------------------------- reading


class FeatureCache:
    """Reads a cache made by :func:`extract_shards`; ``load(sample)`` gives a raw sample's features
    ``(crops, N, D)``, grid and image size in place of its images (the ``images`` of a
    :class:`~training.data.vlm.VLMBuilder`)."""

    batch_key = "patch_features"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        # a cache written before the image layout was recorded holds one crop per image: fixed
        self.identity = {"layout": FIXED_LAYOUT, **index["identity"]}
        self.shards = index["shards"]
        self.grid, self.dim = tuple(index["grid"]), int(index["dim"])
        self._keys: dict[str, dict[str, Any]] = {}  # shard -> key -> (open file, digest) (per worker)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_keys": {}}  # open files stay in the process that opened them

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a cache made with another tower, feature layer, resolution, preprocessing or image layout
        (:func:`cache_identity` of the model), naming each."""
        identity = {"layout": FIXED_LAYOUT, **identity}
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
            if k == "layout":
                mine, theirs = _show_layout(mine), _show_layout(theirs)
            shown.append(f"{IDENTITY[k]}: cache {mine}, model {theirs}")
        how = "with this model's tower"
        if "layout" in diff:
            how += f" and image layout (vision-tower extract --image-layout {identity['layout']['name']})"
        raise ValueError(
            f"feature cache {self.folder} was made with another "
            f"{' and '.join(IDENTITY[k] if k == 'layout' else k.replace('_', ' ') for k in diff)} "
            f"({'; '.join(shown)}): extract the features again {how}, or drop data.feature_cache"
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

    def _open(self, name: str) -> dict[str, tuple[Any, str, Any]]:
        """Key -> (open file, image digest, image sizes or None) of the samples of shard ``name``."""
        files = {}
        for file in self.shards[name]["files"]:
            path = self.folder / file
            try:
                handle = safe_open(path, framework="pt")
                metadata = handle.metadata() or {}
                digests = json.loads(metadata[DIGESTS])
                sizes = json.loads(metadata[SIZES]) if SIZES in metadata else None  # None: before layouts
            except Exception as err:  # safetensors' own error type, or metadata that is not ours
                what = " ".join(str(err).split()) or type(err).__name__
                raise ValueError(f"feature cache file {path} cannot be read ({what}): {AGAIN}") from None
            keys = set(handle.keys())
            for entry, listed in ((DIGESTS, digests), (SIZES, sizes)):
                if listed is not None and (not isinstance(listed, dict) or set(listed) != keys):
                    raise ValueError(
                        f"feature cache file {path}: its metadata {entry} does not list its samples"
                    )
            files.update((key, (handle, digests[key], sizes and sizes[key])) for key in keys)
        return files

    def load(self, sample: dict[str, Any]) -> Images:
        """The sample's cached features ``(crops, N, D)`` (every crop the cache's image layout cut its image
        into), their grid, and the image's (height, width) as training reads it (``fixed``: the tower's
        size)."""
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
        handle, digest, sizes = files[key]
        if image_digest(sample) != digest:
            raise ValueError(
                f"sample {key} of {sample['__url__']} has another image than the one the feature cache "
                f"{self.folder} holds features of (the shard changed since the cache was made): {AGAIN}"
            )
        features = handle.get_tensor(key)  # (crops, N, D)
        if sizes is None:  # a cache written before layouts: one fixed crop per image, the tower's size
            side = int(self.identity["image_size"])
            sizes = [(side, side)] * features.shape[0]
        return Images(features, self.grid, [(int(h), int(w)) for h, w in sizes])


def _show_layout(layout: Any) -> str:
    """``'anyres_max' (max_tiles=4)``: a layout identity as the refusal names it."""
    if not isinstance(layout, dict):
        return repr(layout)
    given = sorted((layout.get("options") or {}).items())
    options = ", ".join(f"{k}={v!r}" for k, v in given if v is not None)
    return repr(layout.get("name")) + (f" ({options})" if options else "")


def extract_to_cache(
    model: str,
    shards: ShardSpec,
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    feature_layer: int = -1,
    image_layout: str = "fixed",
    layout_options: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
) -> CacheSummary:
    """Load the tower of ``model`` (folder, file, hub id or ``preset:NAME``) with its own preprocessing,
    and cache its patch features of ``shards`` in ``out_dir`` (``vision-tower extract --shards``), of the
    crops the image layout ``image_layout`` (a registered name: the VLM's ``model.image_layout``) with
    ``layout_options`` cuts. ``dtype`` (or its name) runs the tower in that precision; None or
    ``"auto"``: as stored."""
    from vision_tower.sources import load_tower, processor_for_tower

    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tower = load_tower(model, image_size=image_size, feature_layer=feature_layer, use_head=False)
    if not isinstance(tower, VisionTower):
        raise ValueError(f"{model} is a NaFlex tower: a feature cache needs a fixed-resolution tower")
    processor = processor_for_tower(model, tower)
    layout = tower_layout(tower, image_layout, **(layout_options or {}))
    identity = cache_identity(tower, processor, layout)  # of the weights as stored, before any cast
    tower = tower.to(device=device, dtype=dtype)
    return extract_shards(
        tower,
        processor,
        shards,
        out_dir,
        layout=layout,
        identity=identity,
        batch_size=batch_size,
        progress=progress,
    )
