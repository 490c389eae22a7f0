"""Where paths in run configs point, and where the shipped run configs live: ``training/configs`` inside an
installed wheel (the repository's
top-level ``configs/`` folder, mapped there by pyproject.toml), else ``configs/`` of the source tree
(a checkout or an editable install)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root of a checkout (or site-packages)
PACKAGED_CONFIGS = ROOT / "training" / "configs"
SOURCE_CONFIGS = ROOT / "configs"


def configs_dir() -> Path:
    """The folder holding ``pretrain/*.yaml`` and ``deepspeed/*.json``."""
    return PACKAGED_CONFIGS if PACKAGED_CONFIGS.is_dir() else SOURCE_CONFIGS


def shipped_config(path: str | Path) -> Path | None:
    """``configs/<rest>`` resolved inside `configs_dir()`, if ``path`` names a shipped config, else None."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] != "configs" or Path(path).is_absolute():
        return None
    found = configs_dir().joinpath(*parts[1:])
    return found if found.exists() else None


def resolve_path(path: str) -> str:
    """Config paths are relative to the working directory, else to the repository root; ``configs/...``
    also names the configs shipped in the package (an installed wheel has no repository root)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    if (ROOT / p).exists():
        return str(ROOT / p)
    return str(shipped_config(p) or p)


def local_paths(values: dict[str, str | None]) -> list[tuple[str, str]]:
    """(config key, path) of the values that name an existing local file or folder (as :func:`resolve_path`
    finds it); presets, hub ids and unset keys are left out."""
    found = []
    for key, value in values.items():
        if value and not str(value).startswith("preset:"):
            path = resolve_path(str(value))
            if Path(path).exists():
                found.append((key, path))
    return found
