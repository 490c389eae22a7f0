"""The closed set of connectors, registered with a decorator like the tower presets, and the config
(registered name, widths, options) that builds one of them again.

The registry holds :class:`~connectors.base.Connector` subclasses but does not import that module (which
imports :class:`ConnectorConfig` from here): classes are typed as ``nn.Module`` subclasses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

from .named import Registry, StrictConfig

ModuleClass = TypeVar("ModuleClass", bound=type[nn.Module])


class ConnectorOptionError(TypeError, ValueError):
    """An unknown connector option, or a value of the wrong type: a ``TypeError`` as Python raises for a
    bad keyword, and a ``ValueError`` (one line on the command line) as it usually comes from a config."""


_CONNECTORS = Registry("connector", ConnectorOptionError)


@dataclass
class ConnectorConfig(StrictConfig):
    """A connector's registered name, widths and options: enough to build it again (``build()``)."""

    WHAT = "connector config"

    name: str
    in_dim: int
    out_dim: int
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return build_connector(self.name, self.in_dim, self.out_dim, **self.options)


def register_connector(
    name: str, *, aliases: dict[str, dict[str, Any]] | None = None
) -> Callable[[ModuleClass], ModuleClass]:
    """Register a :class:`Connector` subclass under ``name``; ``aliases`` map more names to fixed options
    (``{"mlp2x_gelu": {"depth": 2, "act": "gelu"}}``)."""
    return _CONNECTORS.register(name, aliases)


def list_connectors() -> list[str]:
    """Every registered name, aliases included."""
    return _CONNECTORS.names()


def option_names(cls: type[nn.Module]) -> list[str]:
    """The keyword-only options a connector class takes."""
    return Registry.option_names(cls)


def build_connector(name: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    """A fresh connector from ``in_dim`` (the tower's width) to ``out_dim`` (the decoder's embedding width).

    An unknown name lists the known ones; an unknown option lists the connector's options; an alias's
    fixed options cannot be overridden with other values.
    """
    cls, options = _CONNECTORS.resolve(name, options)
    return cls(in_dim, out_dim, **options)
