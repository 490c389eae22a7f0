"""Registry of the contrastive losses, built by name from configs."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a loss module buildable as `build_loss(name, ...)`."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name].__name__})")
        LOSSES[name] = cls
        return cls

    return add


def get_loss(name: str) -> type[nn.Module]:
    """The loss class registered as `name`; an unknown name is an error that lists the known ones.

    A registered class carries its functional form as ``loss_function(img, txt, t', b, *, group, ...)``,
    ``learns_bias`` (whether b enters the loss) and ``tiled`` (whether ``chunk_size`` applies), so that a
    training task can compute the loss with the model's own t' and b."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, **options) -> nn.Module:
    """The loss module registered as `name`, e.g. `build_loss("sigmoid", chunk_size=2048)`."""
    return get_loss(name)(**options)
