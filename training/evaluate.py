"""Zero-shot classification and image-text retrieval for two-tower SigLIP models.

The model is anything with `encode_image(pixel_values) -> (B, D)` and
`encode_text(input_ids) -> (B, D)` (both L2-normalised) and tensors `logit_scale`
(log of the temperature t) and `logit_bias` (b): the score of a pair is
sigmoid(t * <img, txt> + b).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from training.data import ShardSpec, build_dataset, build_loader, default_decode_image
from training.prompts import (
    DEFAULT_TEMPLATES,
    check_distinct_prompts,
    check_templates,
    load_templates,
    prompt_ids,
    warn_cut_prompts,
)
from vision_tower.checkpoint import read_json

__all__ = ["DEFAULT_TEMPLATES", "load_templates", "recall_at_k", "retrieval", "zero_shot"]

IMAGE_FILE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
CLASS_FILE = "classes.json"
TOP5_MIN_CLASSES = 6  # top-5 accuracy is reported only when it is not trivially 1


# ----------------------------------------------------------------------------- helpers


def _device(model: Any, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else torch.as_tensor(model.logit_scale).device


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Model in eval mode and no autograd inside; every submodule's training flag is restored after
    (a tower locked in eval mode stays so)."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    flags = [m.training for m in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _chw(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) from an image transform that may return (1, 3, H, W)."""
    return x[0] if x.dim() == 4 and x.shape[0] == 1 else x


def sigmoid_scores(model: Any, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
    """sigmoid(t * img @ txt.T + b): (N, D), (C, D) -> (N, C)."""
    t = model.logit_scale.exp().to(img_emb)
    return torch.sigmoid(img_emb @ txt_emb.T * t + model.logit_bias.to(img_emb))  # (N, C)


# ----------------------------------------------------------------------------- zero-shot


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
                pixels.append(_chw(image_transform(decode_image(path.read_bytes()))))
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
    dev, hits, n, skipped = _device(model, device), dict.fromkeys(ks, 0), 0, 0
    with _eval_mode(model):
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


def _first_hit_misses(sims: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per query row, the number of negatives scoring >= its best positive: (Q, K) -> (Q,)."""
    best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((sims >= best) & ~positive).sum(dim=1)  # (Q,)


def _recall_one_way(
    queries: torch.Tensor,
    keys: torch.Tensor,
    q_groups: torch.Tensor,
    k_groups: torch.Tensor,
    ks: Sequence[int],
    chunk: int,
) -> dict[int, float]:
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ keys.T  # (Q, K)
        positive = q_groups[start : start + chunk, None] == k_groups[None, :]  # (Q, K)
        if not positive.any(dim=1).all():
            raise ValueError("a query has no matching item: every image needs a text of its group and back")
        misses = _first_hit_misses(sims, positive)  # (Q,)
        for k in ks:
            hits[k] += int((misses < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def recall_at_k(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    img_groups: torch.Tensor | None = None,
    txt_groups: torch.Tensor | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Image->text and text->image recall@k of paired embeddings (N, D), (M, D).

    Image i matches text j when their groups are equal (default: i == j). A query is a hit
    at k when fewer than k non-matching items score at least as high as its best match
    (ties count against it, so a collapsed model scores 0, not 1).
    Returns {"i2t_r1", ..., "t2i_r10"} as fractions.
    """
    if img_groups is None or txt_groups is None:
        if len(img_emb) != len(txt_emb):
            raise ValueError(f"{len(img_emb)} images and {len(txt_emb)} texts: give groups for unpaired sets")
        img_groups = txt_groups = torch.arange(len(img_emb), device=img_emb.device)
    img, txt = img_emb.float(), txt_emb.float()
    i2t = _recall_one_way(img, txt, img_groups, txt_groups, ks, chunk)
    t2i = _recall_one_way(txt, img, txt_groups, img_groups, ks, chunk)
    return {**{f"i2t_r{k}": v for k, v in i2t.items()}, **{f"t2i_r{k}": v for k, v in t2i.items()}}


def _is_shard_spec(data: Any) -> bool:
    if isinstance(data, str | os.PathLike):
        return True
    return (
        isinstance(data, list | tuple) and bool(data) and all(isinstance(x, str | os.PathLike) for x in data)
    )


def embed_pairs(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    max_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image emb (N, D), text emb (N, D), input_ids (N, L)) of a stream of batches."""
    imgs, txts, ids, n = [], [], [], 0
    for batch in batches:
        imgs.append(model.encode_image(batch["pixel_values"].to(device)).float())  # (B, D)
        txts.append(model.encode_text(batch["input_ids"].to(device)).float())  # (B, D)
        ids.append(batch["input_ids"].cpu())
        n += len(ids[-1])
        if max_samples is not None and n >= max_samples:
            break
    if n == 0:
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
    cut = slice(0, max_samples)
    return torch.cat(imgs)[cut], torch.cat(txts)[cut], torch.cat(ids)[cut]


def retrieval(
    model: Any,
    data: ShardSpec | Iterable[dict[str, torch.Tensor]],
    *,
    image_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    text_transform: Callable[[str], torch.Tensor] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    max_samples: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
    match_identical_captions: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Recall@k both ways over image-text pairs: shards (one unshuffled pass) or batches.

    Batches are dicts with "pixel_values" (B, 3, H, W) and "input_ids" (B, L). With
    `match_identical_captions`, a text with exactly the same tokens as an image's own
    caption also counts as a match. Returns recall_at_k's keys plus "n" (and "skipped").
    """
    if _is_shard_spec(data):
        if image_transform is None or text_transform is None:
            raise ValueError("retrieval over shards needs image_transform and text_transform")
        dataset = build_dataset(
            data,
            image_transform=image_transform,
            text_transform=text_transform,
            batch_size=batch_size,
            rank=0,
            world_size=1,
            resampled=False,
            shuffle=False,
            drop_last=False,
        )
        data = build_loader(dataset, num_workers=num_workers)
    dev = _device(model, device)
    with _eval_mode(model):
        img, txt, ids = embed_pairs(model, data, dev, max_samples)
    extra = (
        {
            "skipped": data.skipped,
            "skip_counts": data.skip_counts,
            "truncated_captions": data.truncated_captions,
        }
        if _is_loader(data)
        else {}
    )
    if len(img) == 0:
        raise ValueError(f"retrieval got no samples {extra}")
    groups = torch.unique(ids, dim=0, return_inverse=True)[1].to(dev) if match_identical_captions else None
    result = recall_at_k(img, txt, ks, img_groups=groups, txt_groups=groups)
    return {**result, "n": len(img), **extra}


def _is_loader(data: Any) -> bool:
    return hasattr(data, "skip_counts") and hasattr(data, "state_dict")
