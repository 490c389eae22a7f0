"""The resumable stream every task shares: shards drawn or split by rank and worker, samples shuffled
in a buffer, each raw sample turned into an item by the task's :class:`SampleBuilder` and batched by
its ``collate``, in DataLoader workers.

Every batch carries its worker's cumulative skip counts and position, so :class:`ShardLoader` knows
the totals and can write a ``state_dict()`` from which a new loader continues with exactly the same
batches. Items the builder marks ``truncated`` (text cut to fit) are kept but counted, with one
warning once they pass 1%.

Exact resume: worker streams depend only on (seed, rank, world_size, worker, epoch), and the
DataLoader takes batches from its workers in turn, so batch ``i`` comes from worker
``i % num_workers``. A loader started at step ``k`` gives physical worker ``p`` the stream of worker
``(p + k) % num_workers`` and fast-forwards that stream: with ``resume_state`` it skips the recorded
number of raw samples without decoding them; with ``start_step`` alone it replays (decodes) the
batches already seen. Exactness holds for resampled (endless) streams; in a one-pass stream it holds
until the first worker runs out.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .packing import RowPacker
from .shards import ShardSpec, SkipCounter, SkipSample, distributed_info, expand_shards, iter_tar_samples

log = logging.getLogger(__name__)

TRUNCATION_WARN_SHARE = 0.01  # warn once when more than this share of the texts was cut


class Item(Protocol):
    """What a builder makes of one sample: at least its key, whether its text was cut, and the text
    (shown in the truncation warning)."""

    key: str
    truncated: bool
    text: str


class SampleBuilder(Protocol):
    """What a task brings to the shared stream. ``build`` turns one raw sample (``{"__key__",
    "__url__", ext: bytes}``) into an item or raises :class:`SkipSample`; any other exception is a bug
    and stops the stream. ``collate`` makes a batch (a dict) of items. ``truncation_advice`` ends the
    warning about cut texts (what to do about them)."""

    truncation_advice: str

    def build(self, sample: dict[str, Any]) -> Item: ...

    def collate(self, items: list[Any]) -> dict[str, Any]: ...


@dataclass
class ResumePlan:
    """Where each worker's stream starts: after `start_step` batches of the whole loader."""

    start_step: int = 0
    num_workers: int = 1
    workers: dict[int, dict[str, Any]] = field(default_factory=dict)  # worker -> {"raw", "batches", "skips"}


def batches_before(step: int, worker: int, num_workers: int) -> int:
    """Batches worker `worker` gave to steps 0..step-1 (the DataLoader takes them in turn)."""
    return max(0, -(-(step - worker) // num_workers))


class ShardDataset(IterableDataset):
    """Batches of ``builder.collate(items)`` from shards, each with a ``"__state__"`` entry (skip counts
    and stream position) that :class:`ShardLoader` takes off. Iterate it through :class:`ShardLoader`.
    Its defaults are one process reading one pass in order; :func:`build_dataset` sets them for a run."""

    def __init__(
        self,
        urls: list[str],
        builder: SampleBuilder,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resampled: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        max_consecutive_skips: int = 1000,
        reader: Callable[[str, SkipCounter], Iterator[dict[str, Any]]] = iter_tar_samples,
        mixture: Any = None,
        packer: RowPacker | None = None,
    ) -> None:
        super().__init__()
        self.mixture = mixture  # several sources drawn sample by sample by weight (training.data.mixture)
        self.packer = packer  # batch_size rows of several items each, instead of batch_size items
        self.reader = reader  # raw samples of one url: a shard's, or a piece of a JSON source's
        self.urls, self.builder, self.batch_size, self.seed = urls, builder, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, epoch
        self.resampled, self.shuffle, self.shuffle_buffer = resampled, shuffle, shuffle_buffer
        self.drop_last, self.max_consecutive_skips = drop_last, max_consecutive_skips
        self.plan = ResumePlan()
        if not resampled and len(urls[rank::world_size]) == 0:
            log.warning(
                "rank %d of %d gets no shards: only %d shards for a one-pass split",
                rank,
                world_size,
                len(urls),
            )

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
            "packing": None if self.packer is None else self.packer.fingerprint(),  # older states: None
        } | ({"mixture": self.mixture.fingerprint()} if self.mixture is not None else {})

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
        if self.mixture is not None:
            samples = self.mixture.samples(f"{self.seed}|{self.rank}|{worker}|{self.epoch}", counter)
        else:
            samples = (s for url in self.worker_urls(worker, num_workers) for s in self.reader(url, counter))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"samples|{self.seed}|{self.rank}|{worker}|{self.epoch}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def prepare(self, sample: dict[str, Any], counter: SkipCounter) -> Item | None:
        """The builder's item of one raw sample; None (and counted) if it is skipped."""
        try:
            item = self.builder.build(sample)
        except SkipSample as skip:
            counter.skip(skip.reason, sample["__key__"], sample["__url__"], skip.detail)
            return None
        counter.ok()
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.plan.num_workers:
            raise RuntimeError(
                f"ShardDataset planned for {self.plan.num_workers} workers but runs in "
                f"{num_workers}; iterate it through ShardLoader"
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
        example: str | None = None  # the first text this worker saw cut, for the warning
        pending: list[Item] = []  # packing: the item that opened no row in the last batch, for the next one
        while True:
            if self.packer is None:
                rows = [[it] for it in self._fill(samples, counter, state)]
            else:
                rows = self._fill_rows(samples, counter, state, pending)
            items = [it for row in rows for it in row]
            if not rows or (len(rows) < self.batch_size and self.drop_last):
                break
            state["batches"] += 1
            state["samples"] += len(items)
            state["truncated"] += sum(it.truncated for it in items)
            example = example or next((it.text for it in items if it.truncated), None)
            if state["batches"] > done:  # earlier ones are a replay of batches already seen
                if self.packer is None:
                    batch = self.builder.collate(items)
                else:
                    batch = self.packer.collate(self.builder, rows)
                batch["__state__"] = {
                    **state,
                    "skips": dict(counter.counts),
                    "truncated_example": example,
                    "skip_examples": dict(counter.examples),
                }
                yield batch
        yield {"__state__": {**state, "skips": dict(counter.counts), "final": True}}

    def _fill(self, samples: Iterator[dict[str, Any]], counter: SkipCounter, state: dict) -> list[Item]:
        items: list[Item] = []
        while len(items) < self.batch_size:
            sample = next(samples, None)
            if sample is None:
                break
            state["raw"] += 1
            item = self.prepare(sample, counter)
            if item is not None:
                items.append(item)
        return items

    def _fill_rows(
        self, samples: Iterator[dict[str, Any]], counter: SkipCounter, state: dict, pending: list[Item]
    ) -> list[list[Item]]:
        """Up to ``batch_size`` rows of items, each item in the first row it fits (:class:`RowPacker`), a new
        row when none has room; the first item that finds every row full and no row left waits in
        ``pending`` for the next batch. Its raw sample is not counted in ``state["raw"]`` until then, so a
        stream resumed from this batch's state reads it again."""
        rows: list[list[Item]] = []
        while True:
            if pending:
                item: Item | None = pending.pop()
                state["raw"] += 1
            else:
                sample = next(samples, None)
                if sample is None:
                    return rows
                state["raw"] += 1
                item = self.prepare(sample, counter)
                if item is None:
                    continue
            row = next((r for r in rows if self.packer.fits(r, item)), None)
            if row is not None:
                row.append(item)
            elif len(rows) < self.batch_size:
                rows.append([item])
            else:
                pending.append(item)
                state["raw"] -= 1
                return rows


# ----------------------------------------------------------------------------- loader


def from_worker(err: Exception) -> Exception:
    """The error a DataLoader worker raised, with its own message: torch re-raises it as ``Caught X in
    DataLoader worker process N`` followed by the worker's traceback, all in the message, which the command
    line would print as its one line. The worker's traceback stays as the cause."""
    text = str(err)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return err
    name = type(err).__name__
    for line in reversed(text.rstrip().splitlines()):
        head, sep, message = line.partition(": ")
        if sep and (head == name or head.endswith(f".{name}")):
            try:
                return type(err)(message)
            except Exception:  # noqa: BLE001 - a class that cannot be built from its message alone
                return err
    return err


class ShardLoader:
    """DataLoader over a ShardDataset that collects skip counts and the stream position.

    Iterating yields batches without the `"__state__"` entry. `skip_counts`/`skipped` are
    the totals over workers up to the last batch consumed, `truncated_captions` (of
    `samples_seen`) the texts kept but cut to fit; `state_dict()` is a small JSON-able dict to
    save with a checkpoint and pass back as `resume_state`: the batches from step `k` on then equal
    those of an uninterrupted loader with the same dataset settings and `num_workers` (the consumed
    samples are skipped undecoded; `start_step` alone replays them). An endless (resampled) loader
    iterated again continues where it stopped; a one-pass loader starts a new pass.
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
        skip_limits: dict[str, int] | None = None,
    ) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.skip_limits = dict(skip_limits or {})  # reason -> most skips allowed (on this rank)
        self._skip_examples: dict[str, str] = {}
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
        # a generator of its own: without one, each DataLoader iterator draws its workers' base seed from
        # the global torch RNG, which a resumed run has just restored for dropout (the data order never
        # depends on that seed: the shard and shuffle RNGs are seeded by position)
        generator = torch.Generator().manual_seed(self.dataset.seed * 65_537 + self.dataset.rank)
        batches = iter(DataLoader(self.dataset, generator=generator, **self._loader_kwargs))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - re-raised, unwrapped when a worker raised it
                raise from_worker(err) from err
            state = batch.pop("__state__")
            self._workers[state["worker"]] = {
                k: state[k] for k in ("raw", "batches", "skips", "samples", "truncated")
            }
            self._truncated_example = self._truncated_example or state.get("truncated_example")
            for reason, example in state.get("skip_examples", {}).items():
                self._skip_examples.setdefault(reason, example)
            self._check_skip_limits()
            if not state.get("final"):
                self.step += 1
                self._warn_truncation()
                yield batch
        if self.skipped:
            log.info(
                "data pass done after %d batches; skipped %d: %s", self.step, self.skipped, self.skip_counts
            )

    def _check_skip_limits(self) -> None:
        counts = self.skip_counts
        for reason, limit in self.skip_limits.items():
            if counts.get(reason, 0) > limit:
                raise ValueError(
                    f"{counts[reason]} samples were skipped as {reason}, more than the {limit} allowed "
                    f"(data.max_bad_samples); the first: {self._skip_examples.get(reason, '?')}"
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
        """Samples among `samples_seen` whose text was cut to fit (kept, not skipped)."""
        return sum(state.get("truncated", 0) for state in self._workers.values())

    def _warn_truncation(self) -> None:
        seen, cut = self.samples_seen, self.truncated_captions
        if self._warned_truncation or not seen or cut / seen <= TRUNCATION_WARN_SHARE:
            return
        self._warned_truncation = True
        log.warning(
            "%d of the %d texts so far (%.1f%%) were cut to fit, e.g. %r; %s. Counted as "
            "truncated_captions; this warning is not repeated.",
            cut,
            seen,
            100 * cut / seen,
            self._truncated_example,
            self.dataset.builder.truncation_advice,
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


def shard_dataset(
    shards: ShardSpec,
    builder: SampleBuilder,
    *,
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = True,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    epoch: int = 0,
    drop_last: bool | None = None,
    max_consecutive_skips: int = 1000,
    source: Any = None,
    packer: RowPacker | None = None,
) -> ShardDataset:
    """The per-worker stream of ``builder``'s batches over ``shards`` (brace pattern, list or folder).

    ``resampled=True`` draws shards with replacement for endless step-based training;
    ``resampled=False`` is one pass with shards split by rank then by worker (for evaluation use
    ``shuffle=False``). ``drop_last`` defaults to ``resampled``. rank/world_size default to
    ``distributed_info()``. ``source`` (a :class:`~training.data.json_source.JsonSource`) replaces the
    shards: its pieces are drawn and split as shards are; or a :class:`~training.data.mixture.Mixture`
    (resampled only): its sources drawn sample by sample by weight. ``packer`` (a
    :class:`~training.data.packing.RowPacker`): each batch is ``batch_size`` rows of as many items as fit
    (collated by :func:`.packing.collate_packed`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        rank, world_size = distributed_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    mixture = source if hasattr(source, "parts") else None
    if mixture is not None and not resampled:
        raise ValueError("a mixture of sources is drawn with replacement (resampled=True): training only")
    return ShardDataset(
        expand_shards(shards) if source is None else list(source.urls),
        builder,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        resampled=resampled,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        epoch=epoch,
        drop_last=resampled if drop_last is None else drop_last,
        max_consecutive_skips=max_consecutive_skips,
        **({} if source is None or mixture is not None else {"reader": source.read}),
        mixture=mixture,
        packer=packer,
    )
