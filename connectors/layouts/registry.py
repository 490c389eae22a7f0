"""The closed set of image layouts, registered with a decorator like the connectors, and the config (name and
options) that builds one again for a crop shape.

The registry holds :class:`~connectors.layouts.base.ImageLayout` subclasses but does not import that module
(which imports :class:`LayoutConfig` from here), as the connector registry does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..named import Registry, StrictConfig

LayoutClass = TypeVar("LayoutClass", bound=type)


class LayoutOptionError(TypeError, ValueError):
    """An unknown layout option or a value of the wrong type (a ``TypeError`` as for a bad keyword, a
    ``ValueError`` as it usually comes from a config)."""


_LAYOUTS = Registry("image layout", LayoutOptionError)


@dataclass
class LayoutConfig(StrictConfig):
    """A layout's registered name and options: with a :class:`CropShape`, enough to build it again."""

    WHAT = "image layout config"

    name: str = "fixed"
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, crop: Any) -> Any:
        """The layout for ``crop`` (a :class:`~connectors.layouts.base.CropShape`)."""
        return build_layout(self.name, crop, **self.options)


def register_layout(
    name: str, *, aliases: dict[str, dict[str, Any]] | None = None
) -> Callable[[LayoutClass], LayoutClass]:
    """Register an :class:`ImageLayout` subclass under ``name``; ``aliases`` map more names to fixed options
    (``{"anyres_max_9": {"max_tiles": 9}}``)."""
    return _LAYOUTS.register(name, aliases)


def list_layouts() -> list[str]:
    """Every registered name, aliases included."""
    return _LAYOUTS.names()


def build_layout(name: str, crop: Any, **options: Any) -> Any:
    """The :class:`ImageLayout` ``name`` for crops of ``crop`` (a ``CropShape``: the tower's input size,
    the connector's tokens per crop).

    An unknown name lists the known ones; an unknown option lists the layout's options; an alias's fixed
    options cannot be overridden with other values."""
    cls, options = _LAYOUTS.resolve(name, options)
    return cls(crop, **options)
