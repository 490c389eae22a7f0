"""The closed set of image layouts, registered with a decorator like the connectors, and the config (name and
options) that builds one again for a crop shape.

The registry holds :class:`~connectors.layouts.base.ImageLayout` subclasses but does not import that module
(which imports :class:`LayoutConfig` from here), as the connector registry does."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

LayoutClass = TypeVar("LayoutClass", bound=type)

# name -> (class, fixed options of an alias)
_LAYOUTS: dict[str, tuple[type, dict[str, Any]]] = {}


class LayoutOptionError(TypeError, ValueError):
    """An unknown layout option or a value of the wrong type (a ``TypeError`` as for a bad keyword, a
    ``ValueError`` as it usually comes from a config)."""


@dataclass
class LayoutConfig:
    """A layout's registered name and options: with a :class:`CropShape`, enough to build it again."""

    name: str = "fixed"
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayoutConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in image layout config; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self, crop: Any) -> Any:
        """The layout for ``crop`` (a :class:`~connectors.layouts.base.CropShape`)."""
        return build_layout(self.name, crop, **self.options)


def register_layout(
    name: str, *, aliases: dict[str, dict[str, Any]] | None = None
) -> Callable[[LayoutClass], LayoutClass]:
    """Register an :class:`ImageLayout` subclass under ``name``; ``aliases`` map more names to fixed options
    (``{"anyres_max_9": {"max_tiles": 9}}``)."""

    def add(cls: LayoutClass) -> LayoutClass:
        for key, fixed in [(name, {}), *(aliases or {}).items()]:
            if key in _LAYOUTS:
                raise ValueError(f"image layout {key!r} is registered twice")
            _check_options(cls, key, fixed)
            _LAYOUTS[key] = (cls, dict(fixed))
        cls.name = name
        return cls

    return add


def list_layouts() -> list[str]:
    """Every registered name, aliases included."""
    return sorted(_LAYOUTS)


def layout_option_names(cls: type) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _fits(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_options(cls: type, name: str, options: dict[str, Any]) -> None:
    known = layout_option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise LayoutOptionError(
            f"unknown option(s) {unknown} for image layout {name!r}; known options: {known}"
        )
    params = inspect.signature(cls.__init__).parameters
    for key, value in options.items():
        default = params[key].default
        if default is inspect.Parameter.empty or default is None or _fits(value, default):
            continue
        raise LayoutOptionError(
            f"image layout {name!r} option {key}={value!r}: expected {type(default).__name__} "
            f"(default {default!r})"
        )


def build_layout(name: str, crop: Any, **options: Any) -> Any:
    """The :class:`ImageLayout` ``name`` for crops of ``crop`` (a ``CropShape``: the tower's input size,
    the connector's tokens per crop).

    An unknown name lists the known ones; an unknown option lists the layout's options; an alias's fixed
    options cannot be overridden with other values."""
    if name not in _LAYOUTS:
        raise KeyError(f"unknown image layout {name!r}; known layouts: {', '.join(list_layouts())}")
    cls, fixed = _LAYOUTS[name]
    _check_options(cls, name, options)
    clash = {k: v for k, v in options.items() if k in fixed and fixed[k] != v}
    if clash:
        raise ValueError(
            f"image layout {name!r} fixes {fixed}; got {clash}: use {cls.name!r} to choose these"
        )
    layout = cls(crop, **{**options, **fixed})
    return layout
