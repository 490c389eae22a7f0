"""Reading WebDataset shards: shard lists, tar members grouped into raw samples, the fields every task
reads (image, caption), and the accounting of skipped samples.

A raw sample is ``{"__key__", "__url__", ext: bytes}``. Bad samples (undecodable image, empty or
missing caption, missing image, a tar member cut off) are skipped with a reason from
``SKIP_REASONS``, counted by reason and logged once per reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
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
    "too_long",  # VLM: image tokens and prompt alone exceed data.max_length
    "bad_conversation",  # VLM: a malformed conversation, or placeholders that do not match its images
    "template_mismatch",  # VLM: the chat template's turn-by-turn tokens differ from the whole rendering's
)
ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def local_shard(url: str) -> str:
    """The file path of a shard: a local path (or ``file:PATH``). Anything else is refused: webdataset
    would run a command to read it (``pipe:CMD`` runs CMD in a shell; ``http://``, ``s3://``, ``gs://``
    run curl or a cloud tool), and nothing in a config or on the command line runs a command here."""
    path = url[len("file://") :] if url.startswith("file://") else url.removeprefix("file:")
    if _SCHEME.match(path):
        raise ValueError(
            f"shard {url!r}: only local tar files are read (a {path.split(':', 1)[0]}: shard would run a "
            "command to fetch it); download or mount the shards and give their paths"
        )
    return path


def expand_shards(shards: ShardSpec) -> list[str]:
    """Shard paths from a brace pattern (`a-{000..009}.tar`, `::`-joined), a directory or a list; a shard
    that is not a local file (``pipe:``, a URL) is refused (:func:`local_shard`)."""
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
    local = [local_shard(u) for u in urls]
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
    return local


def check_shard_specs(**specs: str | None) -> None:
    """Fail now, naming the config key, when a shard set that a run will read is absent or refused (a
    missing ``data.val_shards`` used to surface only at the final evaluation, after the last step)."""
    for key, spec in specs.items():
        if spec:
            try:
                paths = expand_shards(spec)
            except (OSError, ValueError) as err:
                raise type(err)(f"data.{key}: {err}") from None
            problems = [(path, why) for path in paths if (why := unreadable_shard(path))]
            if problems and len(problems) == len(paths):  # one bad shard among good ones is skipped, counted
                (path, why), more = problems[0], len(problems) - 1
                raise ValueError(
                    f"data.{key}: no shard holds a sample: {path} is {why}"
                    + (f" (and the {more} other shard(s) likewise)" if more else "")
                )


def unreadable_shard(path: str) -> str | None:
    """Why ``path`` cannot give a sample (an empty file, not a tar archive), from its first header only;
    None when it starts as a tar with a member."""
    try:
        with open(local_shard(path), "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            if tar.next() is None:
                return "a tar archive without members"
    except tarfile.TarError as err:
        return f"not a tar archive ({err})"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None


def shard_paths(**specs: str | None) -> list[tuple[str, str]]:
    """(``data.<key>``, shard file) for each local shard of the shard sets given (those that cannot be
    expanded are left out: :func:`check_shard_specs` reports them)."""
    found = []
    for key, spec in specs.items():
        if spec:
            with contextlib.suppress(OSError, ValueError):
                found += [(f"data.{key}", path) for path in expand_shards(spec)]
    return found


def distributed_info() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ----------------------------------------------------------------------------- skips


class TooManySkips(RuntimeError, ValueError):
    """More samples in a row were unusable than ``max_consecutive_skips`` allows: the data, not the code
    (a ValueError, so the command line says it in one line)."""


class SkipCounter:
    """Counts skipped samples by reason in one worker; warns once per reason, then logs at debug."""

    def __init__(self, max_consecutive: int, counts: dict[str, int] | None = None) -> None:
        self.counts: Counter[str] = Counter(counts or {})
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.silent = False  # while fast-forwarding over already counted samples
        self.examples: dict[str, str] = {}  # reason -> the first skipped sample and why
        self._warned: set[str] = set()

    def skip(self, reason: str, key: str, url: str, detail: str) -> None:
        self.consecutive += 1
        if not self.silent:
            self.counts[reason] += 1
            self.examples.setdefault(reason, f"{key} in {url}: {detail[:200]}")
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
            raise TooManySkips(
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
    path = local_shard(url)  # before the try: a refused shard is an error, not a bad shard to skip
    current: dict[str, Any] | None = None
    reading = None  # the member whose data is being read
    try:
        with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
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


def read_json_member(sample: dict[str, Any]) -> Any:
    """The parsed ``json`` member of a raw sample (a ``bad_caption`` skip if it is not valid JSON)."""
    try:
        return json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exn:
        raise SkipSample("bad_caption", repr(exn)) from exn


def read_caption(sample: dict[str, Any]) -> str:
    """The caption of a raw sample: `txt`, else the `caption`/`text` field of `json`."""
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exn:
            raise SkipSample("bad_caption", repr(exn)) from exn
    elif "json" in sample:
        meta = read_json_member(sample)
        caption = next((meta[f] for f in CAPTION_FIELDS if isinstance(meta, dict) and f in meta), None)
        if isinstance(caption, list):  # several captions: the first non-empty one
            caption = next((c for c in caption if isinstance(c, str) and c.strip()), "")
        if caption is None:
            raise SkipSample("missing_caption", f"json has none of the fields {CAPTION_FIELDS}")
        if not isinstance(caption, str):
            raise SkipSample("bad_caption", f"caption is a {type(caption).__name__}, not a string")
    else:
        raise SkipSample("missing_caption", f"no .txt or .json member (has {sample_fields(sample)})")
    caption = caption.strip()
    if not caption:
        raise SkipSample("empty_caption", "caption is empty or whitespace")
    return caption


def image_member(sample: dict[str, Any]) -> str:
    """The extension of the sample's image member (first of IMAGE_EXTENSIONS present)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SkipSample(
            "missing_image", f"no member with extension {IMAGE_EXTENSIONS} (has {sample_fields(sample)})"
        )
    return ext


def read_image(sample: dict[str, Any], decode_image: Callable[[bytes], Image.Image]) -> Image.Image:
    """The decoded RGB image of a raw sample (first of IMAGE_EXTENSIONS present)."""
    ext = image_member(sample)
    try:
        return decode_image(sample[ext])
    except Exception as exn:  # the decoder's own error (ImageLoadError) or PIL's
        raise SkipSample("bad_image", f"{ext}: {exn!r}") from exn


def sample_fields(sample: dict[str, Any]) -> list[str]:
    """The member extensions of a raw sample."""
    return sorted(k for k in sample if not k.startswith("__"))


def default_decode_image(data: bytes) -> Image.Image:
    """Decode with `vision_tower.images.load_image` (RGB; raises ImageLoadError on bad input)."""
    from vision_tower.images import load_image

    return load_image(data)
