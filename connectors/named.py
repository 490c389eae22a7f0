"""A closed set of classes registered by name with a decorator, with aliases that fix some options, and
strict options: what the connector and the image-layout registries share.

Options are a class's keyword-only ``__init__`` arguments; a value must have its default's type (an int is
a float; a bool is no number) unless the default is None or absent."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

Class = TypeVar("Class", bound=type)


class Registry:
    """Classes of one ``kind`` (``"connector"``, ``"image layout"``) by name. ``error`` is the exception for
    an unknown option or a value of the wrong type."""

    def __init__(self, kind: str, error: type[Exception]) -> None:
        self.kind, self.error = kind, error
        self._classes: dict[str, tuple[type, dict[str, Any]]] = {}  # name -> (class, fixed options)

    def register(
        self, name: str, aliases: dict[str, dict[str, Any]] | None = None
    ) -> Callable[[Class], Class]:
        """A decorator registering a class under ``name`` (set as its ``name``) and under each alias with
        the alias's fixed options."""

        def add(cls: Class) -> Class:
            for key, fixed in [(name, {}), *(aliases or {}).items()]:
                if key in self._classes:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
                self.check_options(cls, key, fixed)
                self._classes[key] = (cls, dict(fixed))
            cls.name = name
            return cls

        return add

    def names(self) -> list[str]:
        """Every registered name, aliases included."""
        return sorted(self._classes)

    @staticmethod
    def option_names(cls: type) -> list[str]:
        """The keyword-only options ``cls`` takes."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    def check_options(self, cls: type, name: str, options: dict[str, Any]) -> None:
        known = self.option_names(cls)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise self.error(f"unknown option(s) {unknown} for {self.kind} {name!r}; known options: {known}")
        params = inspect.signature(cls.__init__).parameters
        for key, value in options.items():
            default = params[key].default
            if default is inspect.Parameter.empty or default is None or _fits(value, default):
                continue
            raise self.error(
                f"{self.kind} {name!r} option {key}={value!r}: expected {type(default).__name__} "
                f"(default {default!r})"
            )

    def resolve(self, name: str, options: dict[str, Any]) -> tuple[type, dict[str, Any]]:
        """The class of ``name`` and the options to build it with (an alias's fixed ones included). An
        unknown name lists the known ones; an unknown option lists the class's options; an alias's fixed
        options cannot be overridden with other values."""
        if name not in self._classes:
            raise KeyError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}")
        cls, fixed = self._classes[name]
        self.check_options(cls, name, options)
        clash = {k: v for k, v in options.items() if k in fixed and fixed[k] != v}
        if clash:
            raise ValueError(
                f"{self.kind} {name!r} fixes {fixed}; got {clash}: use {cls.name!r} to choose these"
            )
        return cls, {**options, **fixed}


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the type of the option's default (an int is a float; a bool is no number)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


class StrictConfig:
    """A dataclass mixin: ``from_dict`` refuses keys the class does not have (naming them and
    ``WHAT``), ``to_dict`` gives its fields."""

    WHAT = "config"

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {cls.WHAT}; known keys: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
