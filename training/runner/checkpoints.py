"""Run checkpoints: DeepSpeed engine state plus each rank's data position and RNG, committed atomically
and proven intact before they are resumed.

A checkpoint ``<out>/checkpoints/step00000100/`` is committed once every rank has written it, its
``MANIFEST.json`` (size and SHA-256 of every file, hashed from disk by all ranks in parallel) has
been written, and rank 0 has replaced ``<out>/checkpoints/COMMITTED`` (write to a temporary file,
then ``os.replace``). A crash while writing leaves the previous checkpoint as the one to resume.

On resume the checkpoint ``COMMITTED`` names is verified against its manifest; a damaged one is
reported (file and fault) and the previous committed one is tried, never silently. Old checkpoints
are pruned only after a newer one is committed, and only those older than it.

Every rank must see the same ``out_dir`` (a shared filesystem across nodes).

Nothing is unpickled on resume: DeepSpeed's own files are read with ``torch.load(weights_only=True)``
(tensors and plain data, plus DeepSpeed's loss-scaler records), so a crafted ``.pt`` in a run folder,
even with its manifest recomputed, is refused instead of run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vision_tower.errors import agreed

from .writes import SaveFailed, failure_line, is_write_error

log = logging.getLogger(__name__)
COMMITTED = "COMMITTED"
MANIFEST = "MANIFEST.json"
CONFIG_RECORD = "run_config.json"  # the run's config as trained up to the checkpoint


class CheckpointDamaged(ValueError):
    """No committed checkpoint is intact, or one could not be read: names the file and the fault."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _step_of(tag: str) -> int:
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else -1


# ----------------------------------------------------------------------------- collectives
def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, world: int) -> dict[str, Any]:
    """Hash every file of ``folder`` (each rank a share), check each rank's files are there, and write
    ``MANIFEST.json`` atomically on rank 0. Collective."""
    rank, _ = _world()
    names = _from_rank0(_files(folder) if rank == 0 else None)
    mine = {n: [(folder / n).stat().st_size, _sha256(folder / n)] for n in names[rank::world]}
    files: dict[str, Any] = {}
    for part in _gather(mine):
        files.update(part)
    missing = [
        name for r in range(world) for name in (f"data_rank{r}.json", f"rng_rank{r}.pt") if name not in files
    ]
    if missing:
        raise CheckpointDamaged(f"checkpoint {folder} was written without {missing}: not committed")
    manifest = {"version": 1, "world_size": world, "files": dict(sorted(files.items()))}
    if rank == 0:
        _write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    _barrier()
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _problems(folder: Path, names: list[str], files: dict[str, Any]) -> list[str]:
    out = []
    for name in names:
        path = folder / name
        size, digest = files[name]
        if not path.is_file():
            out.append(f"{path} is missing")
        elif path.stat().st_size != size:
            out.append(
                f"{path} has {path.stat().st_size} bytes, the manifest {size} (truncated or rewritten)"
            )
        elif _sha256(path) != digest:
            out.append(f"{path} does not match its checksum (changed on disk)")
    return out


def verify(folder: Path) -> list[str]:
    """What is wrong with the checkpoint in ``folder`` (empty when intact). Collective: each rank
    re-hashes a share of the files."""
    rank, world = _world()
    manifest_path = folder / MANIFEST
    files = None
    if rank == 0:
        try:
            files = json.loads(manifest_path.read_text())["files"]
        except FileNotFoundError:
            files = f"{manifest_path} is missing (the checkpoint was never committed)"
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            files = f"{manifest_path} is damaged ({type(err).__name__})"
    files = _from_rank0(files)
    if isinstance(files, str):
        return [files]
    names = sorted(files)[rank::world]
    return [p for part in _gather(_problems(folder, names, files)) for p in part]


def committed_candidates(ckpt_dir: Path) -> list[str]:
    """Tags to try on resume, newest first: the one ``COMMITTED`` names, then older committed ones."""
    marker = ckpt_dir / COMMITTED
    head = marker.read_text().strip() if marker.is_file() else ""
    tags = sorted((p.name for p in ckpt_dir.glob("step*") if (p / MANIFEST).exists()), key=_step_of)
    if _step_of(head) >= 0 and (ckpt_dir / head).is_dir():
        tags = [t for t in tags if _step_of(t) < _step_of(head)] + [head]
    return tags[::-1]


def find_intact(ckpt_dir: Path) -> str | None:
    """The newest committed checkpoint that passes :func:`verify` (same on every rank), or None if there
    is none at all. Raises :class:`CheckpointDamaged` when checkpoints exist and none is intact."""
    rank, _ = _world()
    tags = _from_rank0(committed_candidates(ckpt_dir) if rank == 0 and ckpt_dir.is_dir() else [])
    damaged = []
    for tag in tags:
        problems = verify(ckpt_dir / tag)
        if not problems:
            if damaged and rank == 0:
                log.warning("resuming from the older checkpoint %s instead", tag)
            return tag
        damaged.append(f"{tag}: {problems[0]}")
        if rank == 0:
            log.warning("checkpoint %s is damaged: %s", tag, "; ".join(problems))
    if damaged:
        raise CheckpointDamaged(f"no intact checkpoint in {ckpt_dir}: " + "; ".join(damaged))
    return None


# ----------------------------------------------------------------------------- save and load
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    state["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    data_state: dict[str, Any],
    keep: int,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` on every rank, hash and commit it, then prune older ones. ``config``
    (the run's, as trained) is recorded in it as ``run_config.json``, for ``--resume`` to compare with. If a
    rank's write fails (a full disk), the partial checkpoint is removed, the last committed one stays the
    one to resume, and every rank raises :class:`~training.runner.writes.SaveFailed` with one line."""
    rank, world = _world()
    tag = tag_for(step)
    folder = ckpt_dir / tag
    if rank == 0 and folder.exists():  # left by an interrupted write, or a timeline given up on resume
        shutil.rmtree(folder)
    _barrier()
    failed = None
    try:
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state={"step": step, "world_size": world}, save_latest=False
        )
    except Exception as err:
        if not is_write_error(err):
            raise
        failed = err
        _barrier()  # the one DeepSpeed ends its save with, which the ranks whose writes succeeded reach
    if failed is None:
        try:
            (folder / f"data_rank{rank}.json").write_text(json.dumps(data_state))
            torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
            if rank == 0 and config is not None:
                (folder / CONFIG_RECORD).write_text(json.dumps(config, indent=2, default=list))
        except Exception as err:
            if not is_write_error(err):
                raise
            failed = err
    _check_written(ckpt_dir, folder, failed)
    write_manifest(folder, world)
    if rank == 0:
        _write_atomic(ckpt_dir / COMMITTED, tag)
        prune(ckpt_dir, keep, tag)
    _barrier()
    return folder


def committed_size(ckpt_dir: Path) -> int | None:
    """Bytes of the checkpoint ``COMMITTED`` names, from its manifest (what the next save needs, about)."""
    marker = ckpt_dir / COMMITTED
    try:
        files = json.loads((ckpt_dir / marker.read_text().strip() / MANIFEST).read_text())["files"]
        return sum(size for size, _ in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_written(ckpt_dir: Path, folder: Path, failed: BaseException | None) -> None:
    """Every rank says whether its writes succeeded; if one failed, rank 0 words the failure (before the
    partial folder is removed: its room left is the disk's state at the failure) and removes the partial
    folder, and every rank raises the same line. Collective."""
    rank, _ = _world()
    errors = [
        (r, err) for r, err in enumerate(_gather(None if failed is None else _picklable(failed))) if err
    ]
    if not errors:
        return
    line = None
    if rank == 0:
        first_rank, err = errors[0]
        marker = ckpt_dir / COMMITTED
        last = marker.read_text().strip() if marker.is_file() else None
        kept = (
            f"the last committed checkpoint {last} is intact (--resume continues from it)"
            if last
            else "no checkpoint was committed before it"
        )
        who = f"rank {first_rank}: " if _world()[1] > 1 else ""
        line = who + failure_line(
            f"checkpoint {folder.name}", folder, err, committed_size(ckpt_dir), f"removed {folder}; {kept}"
        )
        shutil.rmtree(folder, ignore_errors=True)
    raise agreed(SaveFailed(_from_rank0(line)))


def _picklable(err: BaseException) -> BaseException:
    """``err`` as an exception every rank can unpickle (torch's and safetensors' may not be)."""
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or str(err)) if err.errno else OSError(str(err))
    name = type(err).__name__
    return RuntimeError(str(err) if name == "RuntimeError" else f"{name}: {err}")


def prune(ckpt_dir: Path, keep: int, current: str) -> None:
    """Keep the ``keep`` newest committed checkpoints up to ``current``; drop older ones and older
    unfinished writes. Folders past ``current`` (a timeline given up on resume) are left alone."""
    now = _step_of(current)
    older = sorted(
        (p for p in ckpt_dir.glob("step*") if p.is_dir() and 0 <= _step_of(p.name) <= now),
        key=lambda p: _step_of(p.name),
    )
    committed = [p for p in older if (p / MANIFEST).exists()]
    kept = {p.name for p in committed[-keep:]} | {current}
    for p in older:
        if p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)


def _deepspeed_safe_globals() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints that ``weights_only`` loading may rebuild: plain
    records (the loss scaler, a parameter fragment's address: no ``__setstate__`` or ``__reduce__``, their
    ``__dict__`` is restored) and the ZeRO stage enum (rebuilt from its value)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loading(engine) -> Iterator[None]:
    """While inside, the DeepSpeed engine reads its checkpoint files with ``torch.load(weights_only=True)``
    (its own checkpoint engine passes ``weights_only=False``)."""
    checkpoint_engine = engine.checkpoint_engine
    allowed = _deepspeed_safe_globals()

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = (
                f"an object of {found.group(1)}" if found else "an object that is not a tensor or plain data"
            )
            raise pickle.UnpicklingError(f"{path} holds {what}: refused to unpickle it") from None

    checkpoint_engine.load = load  # an instance attribute: the class's method is untouched
    try:
        yield
    finally:
        del checkpoint_engine.load


def load(engine, ckpt_dir: Path, tag: str) -> tuple[int, dict[str, Any]]:
    """Restore engine, optimizer, scheduler, RNG from a verified checkpoint; (step, this rank's data
    state)."""
    rank, world = _world()
    folder = ckpt_dir / tag
    data_file = folder / f"data_rank{rank}.json"
    if not data_file.exists():
        saved = sorted(p.name for p in folder.glob("data_rank*.json"))
        raise CheckpointDamaged(
            f"checkpoint {folder} has no data position for rank {rank} of {world} (it holds {saved}): resume "
            f"with the world size it was saved with, on a filesystem every rank sees"
        )
    try:
        with weights_only_loading(engine):
            _, client = engine.load_checkpoint(
                str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except pickle.UnpicklingError as err:
        raise CheckpointDamaged(f"checkpoint {folder} is not resumed: {err}") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointDamaged(
            f"checkpoint {folder} could not be loaded: {type(err).__name__}: {first}"
        ) from err
    if client is None:
        raise CheckpointDamaged(f"DeepSpeed could not load checkpoint {folder} (model state files missing?)")
    if client.get("world_size", world) != world:
        raise CheckpointDamaged(
            f"checkpoint {folder} was saved by {client['world_size']} ranks, this run has {world}: "
            f"exact resume needs the same world size"
        )
    try:
        data_state = json.loads(data_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointDamaged(f"{data_file} is damaged: {err}") from None
    rng_file = folder / f"rng_rank{rank}.pt"
    try:
        _set_rng_state(torch.load(rng_file, weights_only=True))
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        raise CheckpointDamaged(f"{rng_file} is damaged: {type(err).__name__}") from None
    return int(client["step"]), data_state
