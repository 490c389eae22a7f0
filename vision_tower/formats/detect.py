"""Which checkpoint layout a set of keys is in: a closed list, each with what it looks for."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..checkpoint import CheckpointError
from . import big_vision

HF_VISION_ANCHOR = "embeddings.patch_embedding.weight"
OPEN_CLIP_ANCHOR = "visual.trunk.patch_embed.proj.weight"
TIMM_ANCHORS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


@dataclass(frozen=True)
class Layout:
    name: str
    where: str  # where checkpoints in this layout come from
    looks_for: str  # the keys that identify it, for error messages
    matches: Callable[[set[str]], bool]


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "transformers",
        "google/siglip-*, google/siglip2-*, PaliGemma, LLaVA-style VLMs (safetensors + config.json)",
        f"a key ending in {HF_VISION_ANCHOR!r}",
        lambda keys: any(k.endswith(HF_VISION_ANCHOR) for k in keys),
    ),
    Layout(
        "open_clip",
        "timm/ViT-*-SigLIP* (open_clip_model.safetensors + open_clip_config.json)",
        f"{OPEN_CLIP_ANCHOR!r}",
        lambda keys: OPEN_CLIP_ANCHOR in keys,
    ),
    Layout(
        "timm",
        "timm/vit_*_siglip_*.* (model.safetensors + config.json with 'architecture')",
        " and ".join(repr(k) for k in TIMM_ANCHORS),
        lambda keys: all(k in keys for k in TIMM_ANCHORS),
    ),
    Layout(
        "big_vision",
        "big_vision .npz parameter trees (the published SigLIP / SigLIP 2 checkpoints)",
        "'<root>/embedding/kernel' in an .npz (root 'params/img/')",
        lambda keys: big_vision.tower_root(list(keys)) is not None,
    ),
)


def detect_layout(keys: Iterable[str], source: str) -> str:
    """The name of the layout ``keys`` are in; otherwise an error naming the layouts tried and the first keys."""
    keys = list(keys)
    found = set(keys)
    for layout in LAYOUTS:
        if layout.matches(found):
            return layout.name
    tried = "; ".join(f"{layout.name} ({layout.looks_for})" for layout in LAYOUTS)
    raise CheckpointError(
        f"{source} is in no SigLIP checkpoint layout this package reads. Tried: {tried}. "
        f"Its first keys ({len(keys)} in all): {keys[:12]}"
    )
