"""Reading and writing weight files: safetensors (single or sharded), and weights-only torch files."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

Tensor = torch.Tensor


def read_json(path: Path) -> Any:
    """The parsed JSON file; invalid JSON is a ValueError naming the file, line and column."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# JSON types by the Python type a field's value must have (``float`` takes ints too)
JSON_TYPE_NAMES = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def json_type_fits(value: Any, kind: type) -> bool:
    """``value`` parsed from JSON is of ``kind`` (a bool is no number, an int is a float)."""
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def read_json_object(path: Path, fields: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """The parsed JSON file, which must be an object (``{...}``); each of ``fields`` it holds must be of its
    type (or one of its types; ``None`` passes). A wrong type is a ValueError naming file and field."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found a JSON {type(data).__name__}")
    for key, kinds in (fields or {}).items():
        value = data.get(key)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if value is not None and not any(json_type_fits(value, k) for k in kinds):
            want = " or ".join(JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise ValueError(f"{path}: field {key!r} must be {want}, found {json.dumps(value)[:80]}")
    return data


def _refused_pickle(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The weights-only unpickler's refusal, without torch's advice to load the file unsafely."""
    found = re.search(r"GLOBAL (\S+)", str(err))  # "unsupported GLOBAL posix.system" (torch 2.x)
    what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
    return CheckpointError(
        f"{path}: refused to unpickle it: it holds {what}, and only tensors and plain containers are "
        "read from .bin/.pt files (weights_only); convert it to safetensors where it was made"
    )


KeyFilter = Callable[[str], bool]


def _read_sharded(index: Path, keep: KeyFilter) -> dict[str, Tensor]:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map'")
    wanted = {k: f for k, f in weight_map.items() if keep(k)}
    sd: dict[str, Tensor] = {}
    for shard in sorted(set(wanted.values())):  # shards holding none of the wanted keys are not opened
        sd.update(_read_file(index.parent / shard, keep))
    missing = sorted(set(wanted) - set(sd))
    if missing:
        raise CheckpointError(f"{index} lists keys that no shard holds: {missing[:20]}")
    return sd


def _read_file(path: Path, keep: KeyFilter) -> dict[str, Tensor]:
    name = path.name
    if name.endswith(".safetensors"):
        from .safetensors_header import read_header

        read_header(path)  # a truncated or inconsistent file is refused before safetensors reads it
        try:
            with safe_open(path, framework="pt") as f:
                # safe_open is no dict: keys() is its API
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}  # noqa: SIM118
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if name.endswith(".index.json"):
        return _read_sharded(path, keep)
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refused_pickle(path, err) from None
        except (RuntimeError, EOFError) as err:
            reason = str(err).split(". ")[0]
            raise CheckpointError(f"{path}: not a readable torch file ({reason})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path} does not hold a state dict")
        return {k: v for k, v in sd.items() if keep(k)}
    raise CheckpointError(f"{path}: unsupported weight file (expected .safetensors, .index.json, .bin/.pt)")


def read_weights(path: Path, keep: KeyFilter = lambda key: True) -> dict[str, Tensor]:
    """The tensors ``keep`` accepts of one weight file (``.safetensors`` with its header checked first, a
    sharded ``.index.json``, or a weights-only ``.bin``/``.pt``)."""
    return _read_file(Path(path), keep)


def find_weights(folder: Path) -> Path:
    """The weight file of a model folder, preferring safetensors (single, then sharded)."""
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (folder / name).exists():
            return folder / name
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"no single weight file in {folder} (found: {found[:20]})")


def read_checkpoint(
    path: Path, keep: KeyFilter = lambda key: True
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state dict of the keys ``keep`` accepts, parsed config.json or None) of a folder or a weight file.

    Only the tensors kept are read: the image tower of a PaliGemma checkpoint does not load its LM.
    """
    folder = path if path.is_dir() else path.parent
    weights = find_weights(path) if path.is_dir() else path
    config_file = folder / "config.json"
    config = read_json_object(config_file) if config_file.exists() else None
    return _read_file(weights, keep), config


def check_keys(
    module: torch.nn.Module, sd: dict[str, Tensor], *, source: str, ignored: list[str] = ()
) -> None:
    """Any key of ``sd`` missing from, unexpected in or mis-shaped for ``module`` is an error naming it."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected)) + sorted(ignored)
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    dtypes = [
        f"{k}: {str(sd[k].dtype).removeprefix('torch.')}"
        for k, v in expected.items()
        if k in sd and v.is_floating_point() and not sd[k].is_floating_point()
    ]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:30]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:30]}")
        if shapes:
            parts.append(f"mis-shaped keys ({len(shapes)}): {shapes[:30]}")
        if dtypes:
            parts.append(
                f"non-floating-point tensors for floating-point weights ({len(dtypes)}): {dtypes[:30]}"
            )
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(parts)
        )


def strict_load(
    module: torch.nn.Module, sd: dict[str, Tensor], *, source: str, ignored: list[str] = ()
) -> None:
    """Copy ``sd`` into ``module``'s existing storage, after :func:`check_keys`."""
    check_keys(module, sd, source=source, ignored=ignored)
    module.load_state_dict(sd, strict=True)


M = TypeVar("M", bound=torch.nn.Module)


def build_and_load(
    build: Callable[[], M],
    sd: dict[str, Tensor],
    *,
    source: str,
    ignored: list[str] = (),
    dtype: torch.dtype | None = None,
    copy: bool = False,
) -> M:
    """``build()`` on the meta device (no random init, no memory), then the tensors of ``sd`` put in place
    (after :func:`check_keys`), floating ones cast to ``dtype``: the model costs its weights once.
    ``copy=True`` when the caller keeps using ``sd``'s tensors (they would otherwise be shared)."""
    with torch.device("meta"):
        module = build()
    check_keys(module, sd, source=source, ignored=ignored)
    tensors = {}
    for key, value in sd.items():
        new = value.to(dtype) if dtype is not None and value.is_floating_point() else value
        if copy and new is value:
            new = value.clone()
        tensors[key] = new.contiguous()
    module.load_state_dict(tensors, strict=True, assign=True)
    return module


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, the file then given the mode the user's umask allows (the writer
    creates it 0600, unreadable to the other users of a shared machine)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def write_safetensors(sd: dict[str, Tensor], out_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in sd.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out
