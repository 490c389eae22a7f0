"""Zero-shot prompts: templates (checked, loaded from files), their token ids per class, and the checks
that the classes stay apart after tokenization (truncation at the tokenizer's max_length)."""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vision_tower.checkpoint import read_json

log = logging.getLogger(__name__)

# A few of the CLIP ImageNet prompts; "{}" is replaced by the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "itap of a {}.",
)


def check_templates(templates: Sequence[str], where: str = "templates") -> list[str]:
    """Each template must hold exactly one ``{}`` for the class name (``{{``/``}}`` are literal braces)."""
    templates = list(templates)
    if not templates:
        raise ValueError(f"{where}: no templates; give at least one, e.g. 'a photo of a {{}}.'")
    for t in templates:
        if not isinstance(t, str):
            raise ValueError(f"{where}: templates must be strings, got {t!r}")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(t) if f is not None]
        except ValueError as err:
            raise ValueError(f"{where}: template {t!r} has unbalanced braces ({err})") from None
        if len(fields) != 1 or fields[0] not in ("", "0"):
            shown = ", ".join("{" + f + "}" for f in fields) or "none"
            raise ValueError(
                f"{where}: template {t!r} must hold exactly one {{}} for the class name (it has {shown})"
            )
    return templates


def load_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a .txt (one per line) or .json (a list, or {"templates": [...]}) file."""
    file = Path(path)
    if str(path).endswith(".json"):
        data = read_json(file)
        if isinstance(data, dict) and "templates" in data:
            data = data["templates"]
        if not isinstance(data, list):
            raise ValueError(
                f'{file}: expected a JSON list of templates (or {{"templates": [...]}}), '
                f"got a {type(data).__name__}"
            )
        return check_templates(data, str(file))
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return check_templates([line.strip() for line in text.splitlines() if line.strip()], str(file))


def prompt_ids(
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], torch.Tensor],
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids of every (class, template) prompt, (C, T, L), and which were cut at the tokenizer's
    max_length, (C, T) bool, or None when ``tokenize`` has no ``is_truncated(text)``."""
    templates = check_templates(templates)
    texts = [t.format(name) for name in class_names for t in templates]
    ids = torch.cat([tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
    check = getattr(tokenize, "is_truncated", None)
    cut = None if check is None else torch.tensor([bool(check(t)) for t in texts])
    shape = (len(class_names), len(templates))
    return ids.view(*shape, -1), None if cut is None else cut.view(shape)  # (C, T, L), (C, T)


def check_distinct_prompts(
    ids: torch.Tensor, cut: torch.Tensor | None, class_names: Sequence[str], templates: Sequence[str]
) -> None:
    """Two classes whose prompts all get the same ids cannot be told apart: raise, saying why."""
    flat = ids.reshape(ids.shape[0], -1)  # (C, T * L)
    groups = torch.unique(flat, dim=0, return_inverse=True)[1]  # (C,)
    for g in groups.unique():
        same = [class_names[i] for i in (groups == g).nonzero().flatten().tolist()]
        if len(same) < 2:
            continue
        members = (groups == g).nonzero().flatten()
        if cut is not None and cut[members].any():
            c, t = (cut[members].nonzero()[0]).tolist()
            why = (
                f"their prompts are cut at the tokenizer's max_length ({ids.shape[-1]} tokens), e.g. "
                f"{templates[t].format(same[c])!r} (template {templates[t]!r}); use a tokenizer whose "
                "max_length fits the prompts, or shorter templates"
            )
        else:
            why = "the tokenizer maps their names to the same ids (characters outside its vocabulary?)"
        raise ValueError(
            f"classes {same} get identical token ids for every template, so zero-shot cannot tell them "
            f"apart: {why}"
        )


def warn_cut_prompts(cut: torch.Tensor, class_names: Sequence[str], templates: Sequence[str]) -> None:
    if not cut.any():
        return
    c, t = cut.nonzero()[0].tolist()
    log.warning(
        "zero-shot: %d of %d prompts are longer than the tokenizer's max_length and were cut, e.g. "
        "template %r with class %r (%r)",
        int(cut.sum()),
        cut.numel(),
        templates[t],
        class_names[c],
        templates[t].format(class_names[c]),
    )
