"""A decoder folder checked before transformers reads it: ``config.json`` (an object whose fields have the
types its config class declares) and every safetensors file's header (it parses and tiles the data;
floating-point dtypes and the model's shapes for the decoder's tensors), each problem one line naming the
file, instead of transformers' traceback or weights read as garbage."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from transformers import PretrainedConfig

from vision_tower.checkpoint import CheckpointError, read_json_object
from vision_tower.safetensors_header import check_tensors, read_header

try:  # transformers 5.x configs are strict dataclasses: a field of the wrong type raises this
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub
    StrictDataclassError = TypeError  # type: ignore[assignment,misc]


def read_transformers_config(folder: Path) -> PretrainedConfig:
    """``AutoConfig`` of a local folder (never with remote code: called inside ``no_code_from_files``); a
    config.json that is a JSON list, or has a field of the wrong type, is a ValueError naming the file and
    the field."""
    from transformers import AutoConfig

    read_json_object(folder / "config.json")
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (TypeError, StrictDataclassError) as err:  # "Field 'hidden_size' expected int, got str (...)"
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(f"{folder / 'config.json'}: {' '.join(str(cause).split())}") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers would read from ``folder`` (single or sharded); none when it has
    none (transformers' own error, or the refusal of pickled weights, then says so)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: 'weight_map' is not a map of tensor names to shard files")
    shards = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise CheckpointError(f"{index} names shard files that are not there: {absent[:10]}")
    return shards


def expected_tensors(
    config: PretrainedConfig,
) -> tuple[dict[str, tuple[tuple[int, ...], bool]], torch.nn.Module] | None:
    """(name -> (shape, floating) of the causal LM's state dict for ``config``, the model): built on the
    meta device with its plain constructor (no weights, no ``zero.Init``); None for a config that is no
    causal LM transformers knows (its own error says so when it loads)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    with torch.device("meta"):
        model = cls(copy.deepcopy(config))
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in model.state_dict().items()}, model


def _renamed(name: str, key_mapping: dict[str, str] | None) -> str:
    for pattern, replacement in (key_mapping or {}).items():
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    return name


def check_decoder_folder(
    src: str | os.PathLike,
    *,
    config: PretrainedConfig | None = None,
    key_mapping: dict[str, str] | None = None,
    other_prefixes: tuple[str, ...] = (),
) -> None:
    """Check a local decoder folder before transformers loads it (a hub id is left to transformers):
    config.json, then each safetensors header, against the model ``config`` (read from the folder when
    None) describes. ``key_mapping`` renames a multimodal checkpoint's decoder tensors as the load will;
    tensors under ``other_prefixes`` (its tower and projector) are not the decoder's."""
    folder = Path(src)
    if not folder.is_dir():
        return
    if config is None:
        config = read_transformers_config(folder)
    found = expected_tensors(config)
    for file in weight_files(folder):
        entries = read_header(file)
        if found is None:
            continue
        expected, model = found
        prefix = f"{model.base_model_prefix}."
        wanted = {}  # the model's tensor for each of the file's names (as the load will rename them)
        for name in entries:
            if name.startswith(other_prefixes):
                continue
            target = _renamed(name, key_mapping)
            if target not in expected and prefix + target in expected:
                target = prefix + target  # a base model's keys, as transformers accepts them
            if target in expected:
                wanted[name] = expected[target]
        check_tensors(file, entries, wanted, model=f"the decoder ({type(model).__name__})")


__all__ = ["check_decoder_folder", "expected_tensors", "read_transformers_config", "weight_files"]
