"""The closed set of connectors, registered with a decorator like the tower presets, and the config
(registered name, widths, options) that builds one of them again.

The registry holds :class:`~connectors.base.Connector` subclasses but does not import that module (which
imports :class:`ConnectorConfig` from here): classes are typed as ``nn.Module`` subclasses."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

ModuleClass = TypeVar("ModuleClass", bound=type[nn.Module])

# name -> (class, fixed options of an alias)
_CONNECTORS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


@dataclass
class ConnectorConfig:
    """A connector's registered name, widths and options: enough to build it again (``build()``)."""

    name: str
    in_dim: int
    out_dim: int
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in connector config; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self) -> nn.Module:
        return build_connector(self.name, self.in_dim, self.out_dim, **self.options)


def register_connector(
    name: str, *, aliases: dict[str, dict[str, Any]] | None = None
) -> Callable[[ModuleClass], ModuleClass]:
    """Register a :class:`Connector` subclass under ``name``; ``aliases`` map more names to fixed options
    (``{"mlp2x_gelu": {"depth": 2, "act": "gelu"}}``)."""

    def add(cls: ModuleClass) -> ModuleClass:
        for key, fixed in [(name, {}), *(aliases or {}).items()]:
            if key in _CONNECTORS:
                raise ValueError(f"connector {key!r} is registered twice")
            _check_options(cls, key, fixed)
            _CONNECTORS[key] = (cls, dict(fixed))
        cls.name = name
        return cls

    return add


def list_connectors() -> list[str]:
    """Every registered name, aliases included."""
    return sorted(_CONNECTORS)


def option_names(cls: type[nn.Module]) -> list[str]:
    """The keyword-only options a connector class takes."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


class ConnectorOptionError(TypeError, ValueError):
    """An unknown connector option, or a value of the wrong type: a ``TypeError`` as Python raises for a
    bad keyword, and a ``ValueError`` (one line on the command line) as it usually comes from a config."""


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type of the option's default (an int is a float; a bool is no number)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_options(cls: type[nn.Module], name: str, options: dict[str, Any]) -> None:
    known = option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConnectorOptionError(
            f"unknown option(s) {unknown} for connector {name!r}; known options: {known}"
        )
    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or _fits(value, default):
            continue
        raise ConnectorOptionError(
            f"connector {name!r} option {key}={value!r}: expected {type(default).__name__} "
            f"(default {default!r})"
        )


def build_connector(name: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    """A fresh connector from ``in_dim`` (the tower's width) to ``out_dim`` (the decoder's embedding width).

    An unknown name lists the known ones; an unknown option lists the connector's options; an alias's
    fixed options cannot be overridden with other values.
    """
    if name not in _CONNECTORS:
        raise KeyError(f"unknown connector {name!r}; known connectors: {', '.join(list_connectors())}")
    cls, fixed = _CONNECTORS[name]
    _check_options(cls, name, options)
    clash = {k: v for k, v in options.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError(f"connector {name!r} fixes {fixed}; got {clash}: use {cls.name!r} to choose these")
    return cls(in_dim, out_dim, **{**options, **fixed})
