"""Zero-shot classification of two-tower SigLIP models over an image folder (one sub-folder per class).

The model is anything with ``encode_image(pixel_values) -> (B, D)`` and ``encode_text(input_ids) -> (B, D)``
(both L2-normalised) and tensors ``logit_scale`` (log of the temperature t) and ``logit_bias`` (b): the
score of a pair is sigmoid(t * <img, txt> + b)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vision_tower.checkpoint import read_json

from ..data import default_decode_image
from .common import chw, eval_mode, model_device, sigmoid_scores
from .prompts import (
    DEFAULT_TEMPLATES,
    check_distinct_prompts,
    check_templates,
    load_templates,
    prompt_ids,
    warn_cut_prompts,
)

__all__ = ["DEFAULT_TEMPLATES", "list_image_folder", "load_templates", "zero_shot"]

IMAGE_FILE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CLASS_FILE = "classes.json"
TOP5_MIN_CLASSES = 6  # top-5 accuracy is reported only when it is not trivially 1


def list_image_folder(image_dir: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders (sorted) and (image path, class index) pairs of an ImageFolder layout."""
    root = Path(image_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; expected one sub-folder per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise ValueError(
            f"{root} has {len(folders)} class folder(s) {folders}; zero-shot classification needs at "
            "least two (<class>/<image> files)"
        )
    samples = [
        (p, label)
        for label, name in enumerate(folders)
        for p in sorted((root / name).rglob("*"))
        if p.suffix.lower() in IMAGE_FILE_EXTENSIONS and p.is_file()
    ]
    empty = [name for label, name in enumerate(folders) if not any(lab == label for _, lab in samples)]
    if empty:
        raise ValueError(
            f"{root}: class folder(s) without images ({'/'.join(IMAGE_FILE_EXTENSIONS)}): {empty}; "
            "remove them or add images"
        )
    return folders, samples


def read_class_info(image_dir: str | os.PathLike) -> dict[str, Any]:
    """The `classes.json` in `image_dir` or its parent (as written by make-shapes), else {}."""
    for folder in (Path(image_dir), Path(image_dir).parent):
        if (folder / CLASS_FILE).is_file():
            info = read_json(folder / CLASS_FILE)
            if not isinstance(info, dict):
                raise ValueError(
                    f"{folder / CLASS_FILE}: expected a JSON object, got a {type(info).__name__}"
                )
            return info
    return {}


def _class_names(folders: list[str], info: dict[str, Any]) -> list[str]:
    """Names from classes.json's folder -> class map, else the folder names with '_' as spaces."""
    mapping = dict(zip(info.get("folders", []), info.get("classes", [])))
    return [mapping.get(f, f.replace("_", " ")) for f in folders]


def class_embeddings(
    model: Any,
    class_names: Sequence[str],
    templates: Sequence[str],
    tokenize: Callable[[list[str]], torch.Tensor],
    *,
    device: torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Mean of the template embeddings of each class, renormalised: (C, D)."""
    ids, _ = prompt_ids(class_names, templates, tokenize, batch_size)  # (C, T, L)
    return embed_prompts(model, ids, device=device, batch_size=batch_size)


def embed_prompts(
    model: Any, ids: torch.Tensor, *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """(C, T, L) prompt ids -> the class embeddings (C, D): template mean, renormalised."""
    flat = ids.reshape(-1, ids.shape[-1])  # (C * T, L)
    chunks = [model.encode_text(flat[i : i + batch_size].to(device)) for i in range(0, len(flat), batch_size)]
    emb = torch.cat(chunks).float().view(ids.shape[0], ids.shape[1], -1)  # (C, T, D)
    return F.normalize(emb.mean(dim=1), dim=-1)  # (C, D)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Number of rows whose label is among the k best columns, k capped at the column count."""
    n_classes = scores.shape[1]
    top = scores.topk(min(max(ks), n_classes), dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]  # (N, kmax)
    return {k: int(hits[:, : min(k, n_classes)].any(dim=1).sum()) for k in ks}


def _image_batches(
    samples: list[tuple[Path, int]],
    decode_image: Callable[[bytes], Image.Image],
    image_transform: Callable,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(pixels (B, 3, H, W), labels (B,), n unreadable) over the image files."""
    for start in range(0, len(samples), batch_size):
        pixels, labels, bad = [], [], 0
        for path, label in samples[start : start + batch_size]:
            try:
                pixels.append(chw(image_transform(decode_image(path.read_bytes()))))
                labels.append(label)
            except Exception:  # an unreadable file is counted, not fatal
                bad += 1
        if pixels:
            yield torch.stack(pixels), torch.tensor(labels), bad
        else:
            yield torch.empty(0), torch.empty(0, dtype=torch.long), bad


def zero_shot(
    model: Any,
    image_dir: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    *,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    batch_size: int = 64,
    device: torch.device | str | None = None,
    decode_image: Callable[[bytes], Image.Image] = default_decode_image,
) -> dict[str, Any]:
    """Top-1 (and, with more than five classes, top-5) zero-shot accuracy on an ImageFolder.

    One sub-folder per class, at least two, each with images. Class names default to
    `classes.json` beside the folder (see make-shapes), else the folder names with '_' as
    spaces; templates default to that file's, else DEFAULT_TEMPLATES. Two classes whose
    prompts all tokenize alike are an error. Returns {"top1", "top5" (C > 5 only), "n",
    "n_classes", "skipped", "truncated_prompts" (when the tokenizer can tell)}.
    """
    folders, samples = list_image_folder(image_dir)
    info = read_class_info(image_dir)
    names = list(class_names) if class_names is not None else _class_names(folders, info)
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders in {image_dir}")
    templates = check_templates(templates or info.get("templates") or DEFAULT_TEMPLATES)
    ids, cut = prompt_ids(names, templates, tokenize)  # (C, T, L), (C, T)
    check_distinct_prompts(ids, cut, names, templates)
    if cut is not None:
        warn_cut_prompts(cut, names, templates)
    ks = (1, 5) if len(names) >= TOP5_MIN_CLASSES else (1,)
    dev, hits, n, skipped = model_device(model, device), dict.fromkeys(ks, 0), 0, 0
    with eval_mode(model, inference=True):
        text = embed_prompts(model, ids, device=dev)  # (C, D)
        for pixels, labels, bad in _image_batches(samples, decode_image, image_transform, batch_size):
            skipped += bad
            if len(labels):
                scores = sigmoid_scores(model, model.encode_image(pixels.to(dev)).float(), text)  # (B, C)
                for k, h in topk_hits(scores, labels.to(dev), ks).items():
                    hits[k] += h
                n += len(labels)
    if n == 0:
        raise ValueError(f"none of the {len(samples)} images in {image_dir} could be read")
    result = {f"top{k}": hits[k] / n for k in ks}
    result.update(n=n, n_classes=len(names), skipped=skipped)
    if cut is not None:
        result["truncated_prompts"] = int(cut.sum())
    return result


# ----------------------------------------------------------------------------- retrieval
