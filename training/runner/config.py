"""The config sections every training task shares (``optim``, ``run``) and strict YAML loading.

A task's config is a dataclass of sections; :func:`load_sections` reads a YAML file, applies
``section.key=value`` overrides and builds it strictly: an unknown key, a value of the wrong type
(``run.steps=2.7``, ``run.steps=true``) or out of range is an error naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from .paths import ROOT, resolve_path

__all__ = ["ROOT", "OptimSection", "RunSection", "check_range", "load_sections", "resolve_path"]

C = TypeVar("C")


def check_range(
    key: str, value: float | None, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``lo <= value <= hi`` (``lo < value`` if ``lo_open``)."""
    if value is None:
        return
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{key} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{key} must be <= {hi}, got {value}")


@dataclass
class OptimSection:
    """AdamW with decoupled weight decay, linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_range("optim.lr", self.lr, lo=0, lo_open=True)
        check_range("optim.weight_decay", self.weight_decay, lo=0)
        check_range("optim.eps", self.eps, lo=0, lo_open=True)
        check_range("optim.warmup_steps", self.warmup_steps, lo=0)
        check_range("optim.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        check_range("optim.grad_clip", self.grad_clip, lo=0)
        check_range("optim.grad_accum", self.grad_accum, lo=1)
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ValueError(f"optim.betas[{i}] must be in [0, 1), got {beta}")


@dataclass
class RunSection:
    """Length, checkpoints, evaluation, failure policy and the DeepSpeed config of a run."""

    out_dir: str = "runs/pretrain"
    steps: int = 1000
    seed: int = 0
    deepspeed: str = "configs/deepspeed/zero2.json"
    precision: str = "auto"  # auto: bf16 on CUDA and on CPUs with AMX or AVX512-BF16, else fp32
    compile: bool = False  # torch.compile each transformer block
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # stop after this many non-finite or skipped steps in a row

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "keep_checkpoints", "max_bad_steps"):
            check_range(f"run.{name}", getattr(self, name), lo=1)
        for name in ("seed", "save_every", "eval_every"):
            check_range(f"run.{name}", getattr(self, name), lo=0)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"run.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not self.out_dir:
            raise ValueError("run.out_dir must not be empty")


# ----------------------------------------------------------------------------- strict loading
def build_section(cls: type[C], data: Any, where: str = "") -> C:
    """Construct dataclass ``cls`` from a dict, recursively and strictly (keys, types, ranges)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}".lstrip(".")
        sub = hints[name]
        kwargs[name] = (
            build_section(sub, value, key) if dataclasses.is_dataclass(sub) else coerce(value, sub, key)
        )
    try:
        return cls(**kwargs)
    except (ValueError, KeyError, TypeError) as err:
        message = str(err)
        raise ValueError(
            message if not where or message.startswith(where) else f"{where}: {message}"
        ) from err


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` names, or a ``ValueError`` naming ``key``.

    YAML reads ``1e-3`` (no dot) as a string and ``1`` as an int: both are numbers for a float
    field. An int field refuses ``2.7`` and ``true``; a bool field refuses ``1``.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{key}: a value is required")
        (inner,) = [a for a in args if a is not type(None)] or (Any,)
        return coerce(value, inner, key)
    if hint is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, e.g. [0.9, 0.95], got {value!r}")
        return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {_describe(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        return _as_int(value, key)
    if hint is float:
        return _as_float(value, key)
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"{key}: expected a string, got {_describe(value)}")
        return str(value)
    return value


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected an integer, got {_describe(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{key}: expected an integer, got {_describe(value)}")


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a number, got {_describe(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` strings (values parsed as YAML) applied to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from None
        _set_dotted(data, key.strip(), value)
    return data


def load_sections(cls: type[C], path: str | os.PathLike | None, overrides: list[str] = ()) -> C:
    """Read a YAML config into ``cls``, apply overrides, validate every key and value."""
    data: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return build_section(cls, apply_overrides(data, list(overrides)), "")
