"""Read checkpoints of any supported layout into this package's layout.

Pure I/O and key conversion: this module never imports the model classes. It hands them
:class:`Weights` (a config plus a state dict in our layout), which they load strictly. The layout
(transformers, timm, open_clip, big_vision) is found from the keys (:mod:`.formats.detect`);
hyperparameters the weights do not carry come from ``config.json`` / ``open_clip_config.json``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, read_checkpoint, read_json
from .config import NaFlexVisionConfig, SiglipConfig, TextConfig, VisionConfig
from .formats import big_vision, open_clip, timm
from .formats import transformers as hf
from .formats.detect import HF_VISION_ANCHOR, detect_layout
from .formats.keys import part
from .hub import resolve
from .presets import get_preset, list_presets
from .saving import vision_state_dict_hf, write_siglip_weights, write_vision_weights  # noqa: F401 (re-exported)

Tensor = torch.Tensor

# config.json model types whose ``vision_config`` describes a SigLIP tower
_VISION_CONFIG_HOSTS = {
    "siglip",
    "siglip2",
    "paligemma",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
}
_VISION_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")


@dataclass
class Weights:
    """A checkpoint read into this package's layout, ready for a model of ``config`` to load strictly.

    ``ignored`` are source keys that mapped to nothing (reported as unexpected by the strict load);
    ``layout`` names the layout it was read from.
    """

    config: Any  # VisionConfig, NaFlexVisionConfig or SiglipConfig
    state_dict: dict[str, Tensor]
    source: str
    ignored: list[str] = field(default_factory=list)
    layout: str = "transformers"


@dataclass
class _Files:
    """What a model folder or file holds: the tensors kept, and the config files beside them."""

    state_dict: dict[str, Tensor]
    config: dict[str, Any] | None  # config.json
    open_clip: dict[str, Any] | None  # open_clip_config.json


def npz_file(path: Path) -> Path | None:
    """The big_vision ``.npz`` that ``path`` is, or the only one in a folder without other weights."""
    if path.suffix == ".npz":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        found = sorted(path.glob("*.npz"))
        if len(found) == 1:
            return found[0]
    return None


def _read(path: Path, keep_vision_only: bool) -> _Files:
    """Tensors (only the image tower's when ``keep_vision_only``) and config files of a folder or file."""
    folder = path if path.is_dir() else path.parent
    oc_file = folder / open_clip.CONFIG_NAME
    oc = read_json(oc_file) if oc_file.exists() else None
    npz = npz_file(path)
    if npz is not None:
        import numpy as np

        with np.load(npz, allow_pickle=False) as f:
            root = big_vision.tower_root(list(f.files)) or ""
        keep_root = root if keep_vision_only else ""
        sd = big_vision.read_npz(npz, keep=lambda k: k.startswith(keep_root))
        return _Files(sd, None, oc)
    keep = _vision_key if keep_vision_only else (lambda key: True)
    sd, config = read_checkpoint(path, keep=keep)
    return _Files(sd, config, oc)


# Parts of checkpoints that are not the image tower (never read when loading a tower).
_NOT_VISION_PREFIXES = (
    "language_model.",
    "model.language_model.",
    "lm_head.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "text_model.",
    open_clip.TEXT_PREFIX,
)


def _vision_key(key: str) -> bool:
    return not key.startswith(_NOT_VISION_PREFIXES)


# ----------------------------------------------------------------------------- transformers layout
def _prefix(keys: list[str], anchor: str, source: str) -> str:
    """The key prefix (``''``, ``'vision_model.'``, ``'model.vision_tower.'`` ...) in front of ``anchor``."""
    found = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({found})"
        raise CheckpointError(
            f"{source}: found {what} SigLIP tower(s) ending in {anchor!r}; keys start with "
            f"{sorted({k.split('.')[0] for k in keys})[:20]}"
        )
    return found[0]


def _vision_config_dict(config: dict[str, Any] | None) -> dict[str, Any] | None:
    if config is None:
        return None
    if config.get("model_type") in _VISION_MODEL_TYPES:
        return config
    if config.get("model_type") in _VISION_CONFIG_HOSTS or "vision_config" in config:
        return config.get("vision_config") or {}
    return None


def _infer_vision_config(sd: dict[str, Tensor], source: str) -> VisionConfig:
    """Shapes give everything but the number of heads, which comes from a preset of the same shape."""
    patch = sd["patch_embed.weight"]  # (D, C, p, p)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    side = math.isqrt(sd["pos_embed"].shape[0])
    width, mlp = patch.shape[0], sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
    p = patch.shape[-1]
    same = [get_preset(n).vision for n in list_presets()]
    same = [
        v for v in same if (v.hidden_size, v.num_hidden_layers, v.intermediate_size) == (width, depth, mlp)
    ]
    if same and patch.dim() == 4:
        # 384 px in 14 px patches is a 27-token side: a preset with the same grid gives the pixel size
        sizes = [v.image_size for v in same if v.patch_size == p and v.image_size // p == side]
        return VisionConfig(
            hidden_size=width,
            intermediate_size=mlp,
            num_hidden_layers=depth,
            num_attention_heads=same[0].num_attention_heads,
            image_size=sizes[0] if sizes else side * p,
            patch_size=p,
            num_channels=patch.shape[1],
            use_head="head.probe" in sd,
        )
    raise CheckpointError(
        f"{source} has no config.json and its shapes (width {width}, depth {depth}, mlp {mlp}) "
        f"match no preset: put the transformers config.json beside the weights"
    )


def _hf_vision(files: _Files, source: str) -> tuple[dict[str, Tensor], Any, list[str]]:
    sd = files.state_dict
    prefix = _prefix(list(sd), HF_VISION_ANCHOR, source)
    native, leftover = hf.vision_to_native(part(sd, prefix))
    leftover = [prefix + k for k in leftover]
    cfg_dict = _vision_config_dict(files.config)
    naflex = (
        native["patch_embed.weight"].dim() == 2
        or (cfg_dict or {}).get("model_type") == _VISION_MODEL_TYPES[1]
    )
    if cfg_dict is None:
        return native, _infer_vision_config(native, source), leftover
    cfg_dict = {**cfg_dict, "vision_use_head": "head.probe" in native}
    return native, (NaFlexVisionConfig if naflex else VisionConfig).from_hf(cfg_dict), leftover


# ----------------------------------------------------------------------------- other layouts
def _timm_vision(files: _Files, source: str) -> tuple[dict[str, Tensor], Any, list[str]]:
    native, leftover = timm.vision_to_native(files.state_dict)
    return native, _with_source(timm.vision_config, files.config, native, source), leftover


def _open_clip_model_cfg(files: _Files, source: str) -> dict[str, Any]:
    if files.open_clip is None or "model_cfg" not in files.open_clip:
        raise CheckpointError(
            f"{source} is an open_clip checkpoint: put its {open_clip.CONFIG_NAME} (with 'model_cfg') beside it"
        )
    return files.open_clip["model_cfg"]


def _open_clip_vision(files: _Files, source: str) -> tuple[dict[str, Tensor], Any, list[str]]:
    model_cfg = _open_clip_model_cfg(files, source)
    sd = files.state_dict
    native, leftover = timm.vision_to_native(part(sd, open_clip.VISION_PREFIX))
    leftover = [open_clip.VISION_PREFIX + k for k in leftover]
    leftover += [k for k in sd if k.startswith("visual.") and not k.startswith(open_clip.VISION_PREFIX)]
    return native, _with_source(open_clip.vision_config, model_cfg, native, source), leftover


def _big_vision_vision(files: _Files, source: str) -> tuple[dict[str, Tensor], Any, list[str]]:
    params = files.state_dict
    root = big_vision.tower_root(list(params)) or ""
    native, leftover = big_vision.vision_to_native(params, root)
    make = big_vision.naflex_config if native["patch_embed.weight"].dim() == 2 else big_vision.vision_config
    return native, _with_source(make, params, native, root), leftover


def _with_source(make, *args, **kwargs):
    """Config builders raise ValueError/KeyError naming the problem; re-raise as CheckpointError."""
    try:
        return make(*args, **kwargs)
    except (ValueError, KeyError) as err:
        raise CheckpointError(str(err.args[0] if isinstance(err, KeyError) else err)) from err


_VISION_READERS = {
    "transformers": _hf_vision,
    "timm": _timm_vision,
    "open_clip": _open_clip_vision,
    "big_vision": _big_vision_vision,
}


def _keep_head(native: dict[str, Tensor], config: Any, use_head: bool | None, source: str) -> None:
    has_head = "head.probe" in native
    if use_head and not has_head:
        raise CheckpointError(f"use_head=True but {source} has no attention-pooling head")
    config.use_head = has_head if use_head is None else use_head
    if not config.use_head:
        for key in [k for k in native if k.startswith("head.")]:
            del native[key]


def vision_weights_from_files(files: _Files, *, source: str, use_head: bool | None = None) -> Weights:
    """The image tower of a checkpoint's tensors and config files, in any layout."""
    layout = detect_layout(files.state_dict, source)
    native, config, leftover = _VISION_READERS[layout](files, source)
    _keep_head(native, config, use_head, source)
    return Weights(config, native, source, leftover, layout)


def vision_weights_from_state_dict(
    sd: dict[str, Tensor],
    config: dict[str, Any] | None,
    *,
    source: str,
    use_head: bool | None = None,
    open_clip_config: dict[str, Any] | None = None,
) -> Weights:
    """The image tower of an in-memory state dict in any layout and its config dict(s)."""
    return vision_weights_from_files(_Files(sd, config, open_clip_config), source=source, use_head=use_head)


def read_vision_weights(
    src: str | os.PathLike,
    *,
    use_head: bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Weights:
    """The image tower of a folder, file or hub repo id; the rest of the checkpoint is never read."""
    files = _read(resolve(src, revision=revision, cache_dir=cache_dir), keep_vision_only=True)
    return vision_weights_from_files(files, source=str(src), use_head=use_head)


# ----------------------------------------------------------------------------- both towers
def _hf_siglip(files: _Files, source: str) -> tuple[dict[str, Tensor], SiglipConfig, list[str]]:
    sd, config = files.state_dict, files.config
    if config is None or config.get("model_type") != "siglip":
        found = None if config is None else config.get("model_type")
        raise CheckpointError(
            f"{source} is not a transformers SiglipModel checkpoint (config model_type {found!r}); "
            f"for the image tower alone use VisionTower.from_pretrained"
            + ("; a SigLIP 2 NaFlex image tower loads with NaFlexVisionTower" if found == "siglip2" else "")
        )
    cfg = SiglipConfig(
        VisionConfig.from_hf(config.get("vision_config") or {}),
        TextConfig.from_hf(config.get("text_config") or {}),
    )
    native: dict[str, Tensor] = {}
    leftover: list[str] = []
    for tower, prefix, convert in (
        ("vision", "vision_model.", hf.vision_to_native),
        ("text", "text_model.", hf.text_to_native),
    ):
        converted, rest = convert(part(sd, prefix))
        native.update({f"{tower}.{k}": v for k, v in converted.items()})
        leftover += [prefix + k for k in rest]
    for name in ("logit_scale", "logit_bias"):
        if name in sd:
            native[name] = sd[name].reshape(1)
    leftover += [k for k in sd if not k.startswith(("vision_model.", "text_model.", "logit_"))]
    return native, cfg, leftover


def _open_clip_siglip(files: _Files, source: str) -> tuple[dict[str, Tensor], SiglipConfig, list[str]]:
    model_cfg = _open_clip_model_cfg(files, source)
    native, leftover = open_clip.to_native(files.state_dict)
    return native, _with_source(open_clip.siglip_config, model_cfg, native, source), leftover


def _big_vision_siglip(files: _Files, source: str) -> tuple[dict[str, Tensor], SiglipConfig, list[str]]:
    params = files.state_dict
    if (
        big_vision.tower_root(list(params)) != big_vision.VISION_ROOT
        or big_vision.TEXT_ROOT + "head/kernel" not in params
    ):
        raise CheckpointError(
            f"{source}: a two-tower big_vision tree has {big_vision.VISION_ROOT}, {big_vision.TEXT_ROOT} "
            f"and params/t, params/b; for the image tower alone use VisionTower.from_pretrained"
        )
    if params[big_vision.VISION_ROOT + "embedding/kernel"].dim() == 2:
        raise CheckpointError(f"{source} holds a SigLIP 2 NaFlex image tower: load it with NaFlexVisionTower")
    native, leftover = big_vision.siglip_to_native(params)
    return native, _with_source(big_vision.siglip_config, params, native), leftover


def _timm_siglip(files: _Files, source: str):
    raise CheckpointError(
        f"{source} is a timm checkpoint, which holds the image tower only: use VisionTower.from_pretrained"
    )


_SIGLIP_READERS = {
    "transformers": _hf_siglip,
    "timm": _timm_siglip,
    "open_clip": _open_clip_siglip,
    "big_vision": _big_vision_siglip,
}


def read_siglip_weights(
    src: str | os.PathLike, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Weights:
    """Both towers, t' and b of a SigLIP checkpoint (transformers, open_clip or big_vision layout)."""
    files = _read(resolve(src, revision=revision, cache_dir=cache_dir), keep_vision_only=False)
    source = str(src)
    layout = detect_layout(files.state_dict, source)
    native, cfg, leftover = _SIGLIP_READERS[layout](files, source)
    cfg.vision.use_head = "vision.head.probe" in native
    return Weights(cfg, native, source, leftover, layout)
