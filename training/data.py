"""WebDataset pipeline of image-text pairs for SigLIP pretraining and evaluation.

Shards are tar files of `<key>.{jpg,jpeg,png,webp}` + `<key>.txt` (or `<key>.json` with a
`caption`/`text` field), given as a brace pattern, a list or a directory. Each
DataLoader worker reads its own deterministic stream: shards drawn (resampled, for
step-based training) or split (one pass) by rank and by worker, samples shuffled in a
buffer, then decoded, validated, transformed and batched in the worker.

Bad samples (undecodable image, empty or missing caption, missing image, a tar member
cut off) are skipped, counted by reason and logged once per reason; every batch carries
its worker's cumulative counts and position, so `ShardLoader` knows the totals and can
write a `state_dict()` from which a new loader continues with exactly the same batches.
Captions that the tokenizer cuts at its `max_length` are kept but counted
(`ShardLoader.truncated_captions`, `truncation`), with one warning once they pass 1%.

Exact resume: worker streams depend only on (seed, rank, world_size, worker, epoch), and
the DataLoader takes batches from its workers in turn, so batch `i` comes from worker
`i % num_workers`. A loader started at step `k` gives physical worker `p` the stream of
worker `(p + k) % num_workers` and fast-forwards that stream: with `resume_state` it skips
the recorded number of raw samples without decoding them; with `start_step` alone it
replays (decodes) the batches already seen. Exactness holds for resampled (endless)
streams; in a one-pass stream it holds until the first worker runs out.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS: tuple[str, ...] = ("caption", "text")
# Reasons a sample (or, for bad_shard, a whole shard) is skipped.
SKIP_REASONS: tuple[str, ...] = (
    "bad_image",
    "missing_image",
    "missing_caption",
    "bad_caption",
    "empty_caption",
    "truncated",
    "bad_shard",
    "transform",
)
ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]
TRUNCATION_WARN_SHARE = 0.01  # warn once when more than this share of the captions was cut


# ----------------------------------------------------------------------------- shards


def expand_shards(shards: ShardSpec) -> list[str]:
    """Shard URLs from a brace pattern (`a-{000..009}.tar`, `::`-joined), a directory or a list."""
    items = [shards] if isinstance(shards, str | os.PathLike) else list(shards)
    urls: list[str] = []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            urls.extend(sorted(str(p) for p in Path(item).glob("*.tar")))
        else:
            urls.extend(expand_urls(item))
    if not urls:
        raise FileNotFoundError(
            f"no shards found in {shards!r}: give a brace pattern, a list or a folder of .tar"
        )
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.exists(u)]
    if local and len(missing) == len(local):
        raise FileNotFoundError(
            f"none of the {len(local)} shards exist, e.g. {missing[0]!r} (from {shards!r})"
        )
    if missing:
        log.warning(
            "%d of %d shards do not exist (e.g. %s); they will be skipped",
            len(missing),
            len(urls),
            missing[0],
        )
    return urls


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- skips


class SkipCounter:
    """Counts skipped samples by reason in one worker; warns once per reason, then logs at debug."""

    def __init__(self, max_consecutive: int, counts: dict[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.silent = False  # while fast-forwarding over already counted samples
        self._warned: set[str] = set()

    def skip(self, reason: str, key: str, url: str, detail: str) -> None:
        self.consecutive += 1
        if not self.silent:
            self.counts[reason] += 1
            level = logging.DEBUG if reason in self._warned else logging.WARNING
            self._warned.add(reason)
            log.log(
                level,
                "skipping %s in %s: %s (%s)%s",
                key,
                url,
                reason,
                detail[:200],
                "" if level == logging.DEBUG else f"; further {reason!r} skips are counted, not logged",
            )
        if self.consecutive > self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} samples in a row were skipped, the last one {key} in {url}: {reason} "
                f"({detail[:200]}); check the shards, the image decoder and the transforms"
            )

    def ok(self) -> None:
        self.consecutive = 0


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------- reading


def iter_tar_samples(url: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Samples `{"__key__", "__url__", ext: bytes}` of one shard, members grouped by key.

    A member whose data is cut off (truncated file) drops its sample and ends the shard
    ("truncated"); a shard that cannot be opened, or whose headers break, ends there
    ("bad_shard"). A tar cut exactly between members ends quietly; its last sample then
    lacks members and is skipped as missing its caption or image.
    """
    current: dict[str, Any] | None = None
    reading = None  # the member whose data is being read
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                key, ext = base_plus_ext(info.name)
                if not info.isreg() or key is None or os.path.basename(info.name).startswith("__"):
                    continue
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                reading = info.name
                data = tar.extractfile(info).read()
                reading = None
                current = current or {"__key__": key, "__url__": url}
                current.setdefault(ext.lower(), data)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exn:
        if reading is None:
            where = f"after {current['__key__']}" if current else "at the start"
            counter.skip("bad_shard", "-", url, f"unreadable {where}: {exn!r}")
        else:
            counter.skip("truncated", base_plus_ext(reading)[0] or reading, url, f"member {reading}: {exn!r}")
            current = None  # its sample is incomplete
    if current is not None:
        yield current


def read_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw sample: `txt`, else the `caption`/`text` field of `json`."""
    try:
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8")
        elif "json" in sample:
            meta = json.loads(sample["json"])
            caption = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta, dict) and f in meta), None)
            if isinstance(caption, list):  # several captions: the first non-empty one
                caption = next((c for c in caption if isinstance(c, str) and c.strip()), "")
            if caption is None:
                raise SkipSample("missing_caption", f"json has none of the fields {CAPTION_FIELDS}")
            if not isinstance(caption, str):
                raise SkipSample("bad_caption", f"caption is a {type(caption).__name__}, not a string")
        else:
            raise SkipSample("missing_caption", f"no .txt or .json member (has {_exts(sample)})")
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("bad_caption", repr(exn)) from exn
    caption = caption.strip()
    if not caption:
        raise SkipSample("empty_caption", "caption is empty or whitespace")
    return caption


def read_image(sample: dict[str, Any], decode_image: Callable[[bytes], Image.Image]) -> Image.Image:
    """The decoded RGB image of a raw sample (first of IMAGE_EXTENSIONS present)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SkipSample(
            "missing_image", f"no member with extension {IMAGE_EXTENSIONS} (has {_exts(sample)})"
        )
    try:
        return decode_image(sample[ext])
    except Exception as exn:  # the decoder's own error (ImageLoadError) or PIL's
        raise SkipSample("bad_image", f"{ext}: {exn!r}") from exn


def _exts(sample: dict[str, Any]) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def default_decode_image(data: bytes) -> Image.Image:
    """Decode with `vision_tower.images.load_image` (RGB; raises ImageLoadError on bad input)."""
    from vision_tower.images import load_image

    return load_image(data)


def _squeeze(x: torch.Tensor, ndim: int, what: str) -> torch.Tensor:
    """Accept a leading batch dim of 1 (ImageProcessor / Tokenizer on one item)."""
    if x.dim() == ndim + 1 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != ndim:
        raise ValueError(f"{what} must return a tensor with {ndim} dims, got shape {tuple(x.shape)}")
    return x


class TokenizeOne:
    """Turns a batch tokenizer (list[str] -> (B, L)) into a text_transform (str -> (L,)).

    Truncation is reported (`is_truncated`) when the tokenizer has an ``is_truncated(text)`` method,
    as `vision_tower.Tokenizer` does.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> torch.Tensor:
        return self.tokenizer([text])[0]  # (L,)

    def is_truncated(self, text: str) -> bool | None:
        """Was ``text`` cut to the tokenizer's length? None when the tokenizer cannot tell."""
        check = getattr(self.tokenizer, "is_truncated", None)
        return None if check is None else bool(check(text))


def _truncation_check(text_transform: Callable[[str], Any]) -> Callable[[str], bool | None] | None:
    """The text transform's own ``is_truncated(text)``, if it has one."""
    return getattr(text_transform, "is_truncated", None)


# ----------------------------------------------------------------------------- dataset


@dataclass
class ResumePlan:
    """Where each worker's stream starts: after `start_step` batches of the whole loader."""

    start_step: int = 0
    num_workers: int = 1
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)  # worker -> {"raw", "batches", "skips"}


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` gave to steps 0..step-1 (the DataLoader takes them in turn)."""
    return max(0, -(-(step - worker) // num_workers))


@dataclass
class _Item:
    key: str
    pixels: torch.Tensor  # (3, H, W)
    ids: torch.Tensor  # (L,)
    caption: str
    truncated: bool = False


class ShardDataset(IterableDataset):
    """Batches of `{"pixel_values": (B, 3, H, W), "input_ids": (B, L), "caption", "__key__"}` from shards.

    Built by `build_dataset`; iterate it through `build_loader`, which also reads the
    `"__state__"` entry each batch carries (skip counts and stream position).
    """

    def __init__(
        self,
        urls: list[str],
        *,
        image_transform: Callable[[Image.Image], torch.Tensor],
        text_transform: Callable[[str], torch.Tensor],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        resampled: bool,
        shuffle: bool,
        shuffle_buffer: int,
        epoch: int,
        drop_last: bool,
        decode_image: Callable[[bytes], Image.Image],
        max_consecutive_skips: int,
    ) -> None:
        super().__init__()
        self.urls, self.batch_size, self.seed = urls, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.resampled, self.shuffle, self.shuffle_buffer = resampled, shuffle, shuffle_buffer
        self.drop_last, self.max_consecutive_skips = drop_last, max_consecutive_skips
        self.image_transform, self.text_transform, self.decode_image = (
            image_transform,
            text_transform,
            decode_image,
        )
        self.plan = ResumePlan()

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same samples."""
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "batch_size": self.batch_size,
            "resampled": self.resampled,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "n_shards": len(self.urls),
        }

    def worker_urls(self, worker: int, num_workers: int) -> Iterator[str]:
        """Shards of one (rank, worker): drawn with replacement, or this worker's share of one pass."""
        if self.resampled:
            rng = random.Random(f"shards|{self.seed}|{self.rank}|{worker}|{self.epoch}")
            while True:
                yield rng.choice(self.urls)
        urls = list(self.urls)
        if self.shuffle:  # the same order on every rank, so the split is disjoint
            random.Random(f"shards|{self.seed}|{self.epoch}").shuffle(urls)
        yield from urls[self.rank :: self.world_size][worker::num_workers]

    def raw_samples(self, worker: int, num_workers: int, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """Undecoded samples of one worker in their final (shuffled) order."""
        samples = (s for url in self.worker_urls(worker, num_workers) for s in iter_tar_samples(url, counter))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"samples|{self.seed}|{self.rank}|{worker}|{self.epoch}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def prepare(self, sample: dict[str, Any], counter: SkipCounter) -> _Item | None:
        """Decode, validate and transform one raw sample; None (and counted) if it is skipped."""
        key, url = sample["__key__"], sample["__url__"]
        try:
            caption = read_caption(sample)
            image = read_image(sample, self.decode_image)
            try:
                pixels = _squeeze(self.image_transform(image), 3, "image_transform")  # (3, H, W)
                ids = _squeeze(
                    torch.as_tensor(self.text_transform(caption)),
                    1,
                    "text_transform (str -> (L,); wrap a batch tokenizer in TokenizeOne)",
                )  # (L,)
                check = _truncation_check(self.text_transform)
                truncated = bool(check(caption)) if check is not None else False
            except Exception as exn:
                raise SkipSample("transform", repr(exn)) from exn
        except SkipSample as skip:
            counter.skip(skip.reason, key, url, skip.detail)
            return None
        counter.ok()
        return _Item(key, pixels, ids, caption, truncated)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.plan.num_workers:
            raise RuntimeError(
                f"ShardDataset planned for {self.plan.num_workers} workers but runs in "
                f"{num_workers}; iterate it through build_loader"
            )
        worker = (slot + self.plan.start_step) % num_workers
        yield from self._worker_batches(worker, num_workers)

    def _worker_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        saved = self.plan.workers.get(worker)
        counter = SkipCounter(self.max_consecutive_skips, saved["skips"] if saved else None)
        samples = self.raw_samples(worker, num_workers, counter)
        done = batches_before(self.plan.start_step, worker, num_workers)
        state = {"worker": worker, "batches": 0, "raw": 0, "samples": 0, "truncated": 0}
        if saved is not None:  # skip what was consumed, undecoded and uncounted
            counter.silent = True
            state["raw"] = sum(1 for _ in zip(range(saved["raw"]), samples, strict=False))
            state["batches"], counter.silent, counter.consecutive = saved["batches"], False, 0
            state["samples"], state["truncated"] = saved.get("samples", 0), saved.get("truncated", 0)
        example: str | None = None  # the first caption this worker saw cut, for the warning
        while True:
            items = self._fill(samples, counter, state)
            if not items or (len(items) < self.batch_size and self.drop_last):
                break
            state["batches"] += 1
            state["samples"] += len(items)
            state["truncated"] += sum(it.truncated for it in items)
            example = example or next((it.caption for it in items if it.truncated), None)
            if state["batches"] > done:  # earlier ones are a replay of batches already seen
                yield self._collate(
                    items, {**state, "skips": dict(counter.counts), "truncated_example": example}
                )
        yield {"__state__": {**state, "skips": dict(counter.counts), "final": True}}

    def _fill(self, samples: Iterator[dict[str, Any]], counter: SkipCounter, state: dict) -> list[_Item]:
        items: list[_Item] = []
        while len(items) < self.batch_size:
            sample = next(samples, None)
            if sample is None:
                break
            state["raw"] += 1
            item = self.prepare(sample, counter)
            if item is not None:
                items.append(item)
        return items

    @staticmethod
    def _collate(items: list[_Item], state: dict[str, Any]) -> dict[str, Any]:
        lengths = {tuple(it.ids.shape) for it in items}
        if len(lengths) > 1:
            raise ValueError(
                f"text_transform gave token sequences of lengths {sorted(lengths)}; "
                "pad to a fixed length (max_length padding)"
            )
        return {
            "pixel_values": torch.stack([it.pixels for it in items]),  # (B, 3, H, W)
            "input_ids": torch.stack([it.ids for it in items]).long(),  # (B, L)
            "caption": [it.caption for it in items],
            "__key__": [it.key for it in items],
            "__state__": state,
        }


def build_dataset(
    shards: ShardSpec,
    *,
    image_transform: Callable[[Image.Image], torch.Tensor],
    text_transform: Callable[[str], torch.Tensor],
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = True,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    epoch: int = 0,
    drop_last: bool | None = None,
    decode_image: Callable[[bytes], Image.Image] = default_decode_image,
    max_consecutive_skips: int = 1000,
) -> ShardDataset:
    """The per-worker pipeline over `shards` (brace pattern, list or folder of .tar).

    `image_transform`: PIL RGB image -> (3, H, W) float tensor (an `ImageProcessor` works, its
    (1, 3, H, W) is squeezed); `text_transform`: str -> (L,) token ids (`TokenizeOne(tokenizer)`).
    `resampled=True` draws shards with replacement for endless step-based training;
    `resampled=False` is one pass with shards split by rank then by worker (for evaluation use
    `shuffle=False`). `drop_last` defaults to `resampled`. rank/world_size default to
    `distributed_info()`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        rank, world_size = distributed_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    urls = expand_shards(shards)
    if not resampled and len(urls[rank::world_size]) == 0:
        log.warning(
            "rank %d of %d gets no shards: only %d shards for a one-pass split", rank, world_size, len(urls)
        )
    return ShardDataset(
        urls,
        image_transform=image_transform,
        text_transform=text_transform,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        epoch=epoch,
        drop_last=resampled if drop_last is None else drop_last,
        decode_image=decode_image,
        max_consecutive_skips=max_consecutive_skips,
    )


# ----------------------------------------------------------------------------- loader


class ShardLoader:
    """DataLoader over a ShardDataset that collects skip counts and the stream position.

    Iterating yields batches without the `"__state__"` entry. `skip_counts`/`skipped` are
    the totals over workers up to the last batch consumed, `truncated_captions` (of
    `samples_seen`) the captions kept but cut by the tokenizer; `state_dict()` is a small
    JSON-able dict to save with a checkpoint and pass back as `resume_state`. An endless
    (resampled) loader iterated again continues where it stopped; a one-pass loader starts
    a new pass.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        *,
        num_workers: int = 2,
        start_step: int = 0,
        resume_state: dict[str, Any] | None = None,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.step, self._workers = start_step, {}
        self._truncated_example: str | None = None
        self._warned_truncation = False
        if resume_state is not None:
            self.step, self._workers = self._check_resume(resume_state, start_step)
        self._start = (self.step, dict(self._workers))
        self._loader_kwargs = {
            "batch_size": None,
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "prefetch_factor": prefetch_factor if num_workers else None,
        }

    def _check_resume(self, state: dict[str, Any], start_step: int) -> tuple[int, dict[int, dict]]:
        mine = {**self.dataset.fingerprint(), "num_workers": self.num_workers}
        theirs = {**state.get("fingerprint", {}), "num_workers": state.get("num_workers")}
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError(
                f"resume_state does not match this loader (saved, now): {diff}; rebuild the loader "
                "with the saved settings, or pass start_step alone to replay"
            )
        if start_step and start_step != state["step"]:
            raise ValueError(f"start_step={start_step} but resume_state was saved at step {state['step']}")
        return int(state["step"]), {int(w): dict(s) for w, s in state["workers"].items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.dataset.resampled:  # a new pass, from the requested start
            self.step, self._workers = self._start[0], dict(self._start[1])
        self.dataset.plan = ResumePlan(self.step, max(1, self.num_workers), dict(self._workers))
        for batch in DataLoader(self.dataset, **self._loader_kwargs):
            state = batch.pop("__state__")
            self._workers[state["worker"]] = {
                k: state[k] for k in ("raw", "batches", "skips", "samples", "truncated")
            }
            self._truncated_example = self._truncated_example or state.get("truncated_example")
            if not state.get("final"):
                self.step += 1
                self._warn_truncation()
                yield batch
        if self.skipped:
            log.info(
                "data pass done after %d batches; skipped %d: %s", self.step, self.skipped, self.skip_counts
            )

    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, summed over workers (bad_shard counts shards)."""
        total: Counter[str] = Counter()
        for state in self._workers.values():
            total.update(state["skips"])
        return dict(sorted(total.items()))

    @property
    def skipped(self) -> int:
        return sum(self.skip_counts.values())

    @property
    def samples_seen(self) -> int:
        """Samples in the batches consumed so far (before a resume included)."""
        return sum(state.get("samples", 0) for state in self._workers.values())

    @property
    def truncated_captions(self) -> int:
        """Captions among `samples_seen` that the tokenizer cut at its max_length."""
        return sum(state.get("truncated", 0) for state in self._workers.values())

    @property
    def truncation(self) -> dict[str, float | int]:
        """``{"truncated_captions": n, "truncated_share": n / samples_seen}`` for a metrics line."""
        seen = self.samples_seen
        share = self.truncated_captions / seen if seen else 0.0
        return {"truncated_captions": self.truncated_captions, "truncated_share": round(share, 6)}

    def _warn_truncation(self) -> None:
        seen, cut = self.samples_seen, self.truncated_captions
        if self._warned_truncation or not seen or cut / seen <= TRUNCATION_WARN_SHARE:
            return
        self._warned_truncation = True
        log.warning(
            "%d of the %d captions so far (%.1f%%) are longer than the tokenizer's max_length and were "
            "cut, e.g. %r; train a tokenizer that fits them (vision-tower train-tokenizer) or raise "
            "max_length. Counted as truncated_captions; this warning is not repeated.",
            cut,
            seen,
            100 * cut / seen,
            self._truncated_example,
        )

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch consumed: pass as `resume_state` to continue exactly."""
        return {
            "version": 1,
            "step": self.step,
            "num_workers": self.num_workers,
            "fingerprint": self.dataset.fingerprint(),
            "workers": {str(w): {**s, "skips": dict(s["skips"])} for w, s in sorted(self._workers.items())},
        }


def build_loader(
    dataset: ShardDataset,
    *,
    num_workers: int = 2,
    start_step: int = 0,
    resume_state: dict[str, Any] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> ShardLoader:
    """Load `dataset` in `num_workers` processes (0: in this one), from `start_step` or a saved state.

    The batches from step `k` on equal those of an uninterrupted loader with the same
    dataset settings and `num_workers`: `resume_state` (a `state_dict()`) skips the consumed
    samples undecoded; `start_step` alone replays them.
    """
    return ShardLoader(
        dataset,
        num_workers=num_workers,
        start_step=start_step,
        resume_state=resume_state,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
