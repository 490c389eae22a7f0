"""Several training sources in one stream, drawn sample by sample in proportion to their weights (as
LLaVA-OneVision, Cambrian and nanoVLM mix their data): ``data.sources`` in a ``train-vlm`` config, each a
shard set (``train_shards``) or a JSON file with its image folder (``train_json``, ``image_folder``), with a
``weight`` (default 1).

Each source keeps its own endless stream of pieces (shards drawn with replacement), and every raw sample
of the mixed stream comes from source ``k`` with probability ``weight_k / sum(weights)``, whatever the
sizes of its shards or pieces. The draws depend only on (seed, rank, worker, epoch), so the stream replays
exactly on resume, like one source's.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .shards import SkipCounter, expand_shards, iter_tar_samples

Reader = Callable[[str, SkipCounter], Iterator[dict[str, Any]]]
SOURCE_KEYS = ("train_shards", "train_json", "image_folder", "weight")


@dataclass
class Part:
    name: str  # how the config names it: data.sources[k]
    urls: list[str]  # its shards, or the pieces of its JSON file
    reader: Reader  # the raw samples of one url
    weight: float


class Mixture:
    """Sources drawn sample by sample by weight; ``urls`` / ``read`` as a single source's (the loader's
    fingerprint counts them), ``samples`` the mixed stream of one (rank, worker)."""

    def __init__(self, parts: list[Part]) -> None:
        if not parts:
            raise ValueError("data.sources is empty: give at least one source")
        self.parts = parts
        self.urls = [url for part in parts for url in part.urls]

    def fingerprint(self) -> list[list[Any]]:
        """What must match for a saved stream position to mean the same samples."""
        return [[part.name, len(part.urls), part.weight] for part in self.parts]

    def samples(self, seed: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        """The endless mixed stream; ``seed`` names the (run seed, rank, worker, epoch) it belongs to."""
        streams = [self._endless(part, f"{seed}|{k}", counter) for k, part in enumerate(self.parts)]
        weights = [part.weight for part in self.parts]
        rng = random.Random(f"mixture|{seed}")
        indices = range(len(self.parts))
        while True:
            yield next(streams[rng.choices(indices, weights)[0]])

    @staticmethod
    def _endless(part: Part, seed: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
        rng = random.Random(f"shards|{seed}")
        while True:
            yield from part.reader(rng.choice(part.urls), counter)


def check_source_spec(k: int, spec: Any) -> dict[str, Any]:
    """One entry of ``data.sources``, its keys and values checked; returns it with ``weight`` filled in."""
    name = f"data.sources[{k}]"
    if not isinstance(spec, dict):
        raise ValueError(f"{name} must be a mapping (train_shards or train_json, image_folder, weight)")
    unknown = sorted(set(spec) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; its keys: {', '.join(SOURCE_KEYS)}")
    if bool(spec.get("train_shards")) == bool(spec.get("train_json")):
        raise ValueError(f"{name}: set one of train_shards and train_json")
    for key in ("train_shards", "train_json", "image_folder"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ValueError(f"{name}.{key} must be a path, got {spec[key]!r}")
    if spec.get("image_folder") and not spec.get("train_json"):
        raise ValueError(
            f"{name}.image_folder holds the images of its train_json: set it, or drop the folder"
        )
    weight = spec.get("weight", 1.0)
    if isinstance(weight, str):  # YAML reads 1e-3 (no dot) as a string
        with contextlib.suppress(ValueError):
            weight = float(weight)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise ValueError(f"{name}.weight must be a number above 0, got {weight!r}")
    return {**spec, "weight": float(weight)}


def build_mixture(specs: list[dict[str, Any]], resolve: Callable[[str], str]) -> Mixture:
    """The :class:`Mixture` of checked ``data.sources`` entries; ``resolve`` turns a config path into a
    file path."""
    from .json_source import JsonSource

    parts = []
    for k, spec in enumerate(specs):
        name = f"data.sources[{k}]"
        if spec.get("train_json"):
            folder = spec.get("image_folder")
            try:
                source = JsonSource(resolve(spec["train_json"]), folder and resolve(folder))
            except (OSError, ValueError) as err:  # its message names data.train_json: say which source
                raise type(err)(f"{name}: {err}") from None
            parts.append(Part(name, list(source.urls), source.read, spec["weight"]))
        else:
            try:
                urls = expand_shards(resolve(spec["train_shards"]))
            except (OSError, ValueError) as err:
                raise type(err)(f"{name}.train_shards: {err}") from None
            parts.append(Part(name, urls, iter_tar_samples, spec["weight"]))
    return Mixture(parts)
