"""Which optional extra a command needs, checked before the command does any work.

The extras are read from the installed package's own metadata (``pyproject.toml``'s
``[project.optional-dependencies]``), so this module holds no second list that could drift from it:
``require("train")`` checks that every distribution the ``[train]`` extra asks for (and the extras it
includes, ``[connectors]``) is installed at a version the extra accepts, and otherwise raises one
:class:`MissingExtraError` that names the extra, the install command and what is missing.
"""

from __future__ import annotations

import re
from importlib import metadata

from packaging.requirements import InvalidRequirement, Requirement

DISTRIBUTION = "vision-tower"


class MissingExtraError(ImportError):
    """A command needs an extra that is not (completely) installed."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str = DISTRIBUTION) -> list[Requirement]:
    reqs = []
    for line in metadata.requires(dist) or []:
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement:  # pragma: no cover - setuptools writes valid metadata
            continue
    return reqs


def extra_requirements(extra: str, dist: str = DISTRIBUTION) -> list[Requirement]:
    """The requirements of ``extra`` with the extras it includes (``vision-tower[connectors]``) expanded."""
    reqs = _requirements(dist)
    known = {_canonical(e) for e in metadata.metadata(dist).get_all("Provides-Extra") or []}
    if _canonical(extra) not in known:
        raise ValueError(f"{dist} has no extra {extra!r}; its extras: {', '.join(sorted(known))}")
    out: list[Requirement] = []
    todo, seen = [_canonical(extra)], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for req in reqs:
            if req.marker is None or not req.marker.evaluate({"extra": name}):
                continue
            if _canonical(req.name) == _canonical(dist):
                todo.extend(_canonical(e) for e in req.extras)
            else:
                out.append(req)
    return out


def missing_requirements(extra: str, dist: str = DISTRIBUTION) -> list[str]:
    """What ``extra`` asks for that is absent (``deepspeed``) or at a version it refuses
    (``transformers 4.57.0 (needs >=5.0)``); empty when the extra is complete."""
    missing = []
    for req in extra_requirements(extra, dist):
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            missing.append(req.name)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req.name} {version} (needs {req.specifier})")
    return missing


def require(extra: str | None, what: str) -> None:
    """Raise :class:`MissingExtraError` when ``extra`` is not completely installed.

    ``what`` names the command or feature that needs it, for the message. ``None`` needs nothing. When
    the package's metadata cannot be read (running from a source tree that was never installed), the
    check is skipped and the imports themselves decide."""
    if extra is None:
        return
    try:
        missing = missing_requirements(extra)
    except metadata.PackageNotFoundError:
        return
    if missing:
        raise MissingExtraError(
            f"{what} needs the [{extra}] extra, which is not completely installed (missing: "
            f'{", ".join(missing)}); install it with: pip install "{DISTRIBUTION}[{extra}]"'
        )


def extra_providing(module: str, dist: str = DISTRIBUTION) -> str | None:
    """The smallest extra whose requirements include the distribution that ships the top-level
    ``module`` (``deepspeed`` -> ``train``), or None when no extra does (a bug, not a missing extra)."""
    top = module.partition(".")[0]
    try:
        providers = {_canonical(d) for d in metadata.packages_distributions().get(top, [])}
        extras = metadata.metadata(dist).get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:
        return None
    providers.add(_canonical(top))  # not installed at all: the module is usually named like its distribution
    candidates = []
    for extra in extras:
        names = {_canonical(r.name) for r in extra_requirements(extra, dist)}
        if names & providers:
            candidates.append((len(names), extra))
    return min(candidates)[1] if candidates else None
