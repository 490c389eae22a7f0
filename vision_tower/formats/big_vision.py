"""big_vision ``.npz`` parameter trees (the published SigLIP / SigLIP 2 checkpoints) -> our layout.

The file is a flat ``numpy.savez`` of the Flax tree, keys joined by ``/``: the image tower under
``params/img/``, the text tower under ``params/txt/``, t' and b as ``params/t`` / ``params/b``.
Flax stores ``Dense`` kernels as (in, out) (torch ``Linear`` holds (out, in)), the patch ``Conv`` as
(p, p, C, D), attention projections per head (query/key/value (D, H, hd), out (H, hd, D)), and the
position table as (1, N, D). Checkpoints trained with ``scan`` stack the blocks into one
``encoderblock`` subtree with a leading depth axis. The MAP head's query and key/value become our
``head.q`` and ``head.kv``. Everything a config needs (heads included) is in the shapes; big_vision's
MLPs use the tanh GELU (``flax.linen.gelu``'s default). The registered :data:`FORMAT` reads (never
writes) these trees, from an ``.npz`` or a folder holding one and no other weights.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..config import NaFlexVisionConfig, SiglipConfig, TextConfig, VisionConfig
from .keys import depth_of, part, text_shape
from .registry import Files, Format, Read, register_format, with_source

Tensor = torch.Tensor
ACT = "gelu_pytorch_tanh"
VISION_ROOT = "params/img/"
TEXT_ROOT = "params/txt/"
EPS = 1e-6  # flax.linen.LayerNorm's default

_BLOCK = re.compile(r"^encoderblock_(\d+)/(.+)$")


def _tensor(array: np.ndarray) -> Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 saved as raw 2-byte records
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def read_npz(path: str | os.PathLike, keep: Callable[[str], bool] = lambda key: True) -> dict[str, Tensor]:
    """The arrays of a big_vision ``.npz`` whose keys ``keep`` accepts, as tensors (nothing is unpickled)."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: _tensor(npz[k]) for k in npz.files if keep(k)}


def tower_root(keys: list[str], anchor: str = "embedding/kernel") -> str | None:
    """The image tower's prefix (``params/img/``, ``img/``, ``''`` ...) in front of its patch embedding."""
    found = sorted({k[: -len(anchor)] for k in keys if k.endswith(anchor)}, key=len)
    found = [p for p in found if p == "" or p.endswith("/")]
    return found[0] if found else None  # shortest: "params/img/" before any nested copy


def _unstack(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """``encoderblock/X`` with a leading depth axis (scan) -> ``encoderblock_i/X``."""
    out = {}
    for key, value in tree.items():
        if key.startswith("encoderblock/"):
            for i, part in enumerate(value.unbind(0)):
                out[f"encoderblock_{i}/{key[len('encoderblock/') :]}"] = part
        else:
            out[key] = value
    return out


def _dense(tree: dict[str, Tensor], path: str) -> tuple[Tensor, Tensor]:
    """A Flax ``Dense`` -> torch ``Linear`` (weight (out, in), bias)."""
    return tree.pop(f"{path}/kernel").t(), tree.pop(f"{path}/bias")


def _heads(tree: dict[str, Tensor], path: str, name: str) -> tuple[Tensor, Tensor]:
    """Per-head query/key/value (D, H, hd), bias (H, hd) -> (H*hd, D), (H*hd,)."""
    kernel = tree.pop(f"{path}/{name}/kernel")
    return kernel.reshape(kernel.shape[0], -1).t(), tree.pop(f"{path}/{name}/bias").reshape(-1)


def _norm(tree: dict[str, Tensor], path: str, ours: str, out: dict[str, Tensor]) -> None:
    out[f"{ours}.weight"] = tree.pop(f"{path}/scale")
    out[f"{ours}.bias"] = tree.pop(f"{path}/bias")


def _linear(tree: dict[str, Tensor], path: str, ours: str, out: dict[str, Tensor]) -> None:
    out[f"{ours}.weight"], out[f"{ours}.bias"] = _dense(tree, path)


def _attention_out(tree: dict[str, Tensor], path: str, ours: str, out: dict[str, Tensor]) -> None:
    kernel = tree.pop(f"{path}/out/kernel")  # (H, hd, D)
    out[f"{ours}.weight"] = kernel.reshape(-1, kernel.shape[-1]).t()
    out[f"{ours}.bias"] = tree.pop(f"{path}/out/bias")


def _encoder(tree: dict[str, Tensor], root: str, out: dict[str, Tensor]) -> None:
    """The blocks and final norm under ``root`` (``Transformer`` or ``Encoder_0``), popped from ``tree``."""
    sub = _unstack({k[len(root) + 1 :]: tree.pop(k) for k in list(tree) if k.startswith(root + "/")})
    layers = sorted({int(m.group(1)) for m in map(_BLOCK.match, sub) if m})
    for i in layers:
        block, ours = f"encoderblock_{i}", f"encoder.blocks.{i}"
        attn = f"{block}/MultiHeadDotProductAttention_0"
        _norm(sub, f"{block}/LayerNorm_0", f"{ours}.norm1", out)
        _norm(sub, f"{block}/LayerNorm_1", f"{ours}.norm2", out)
        parts = [_heads(sub, attn, n) for n in ("query", "key", "value")]
        out[f"{ours}.attn.qkv.weight"] = torch.cat([w for w, _ in parts])
        out[f"{ours}.attn.qkv.bias"] = torch.cat([b for _, b in parts])
        _attention_out(sub, attn, f"{ours}.attn.proj", out)
        _linear(sub, f"{block}/MlpBlock_0/Dense_0", f"{ours}.mlp.fc1", out)
        _linear(sub, f"{block}/MlpBlock_0/Dense_1", f"{ours}.mlp.fc2", out)
    _norm(sub, "encoder_norm", "norm", out)
    tree.update({f"{root}/{k}": v for k, v in sub.items()})  # whatever is left is reported


def _map_head(tree: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    attn = "MAPHead_0/MultiHeadDotProductAttention_0"
    out["head.probe"] = tree.pop("MAPHead_0/probe")  # (1, 1, D)
    out["head.q.weight"], out["head.q.bias"] = _heads(tree, attn, "query")
    (kw, kb), (vw, vb) = _heads(tree, attn, "key"), _heads(tree, attn, "value")
    out["head.kv.weight"], out["head.kv.bias"] = torch.cat([kw, vw]), torch.cat([kb, vb])
    _attention_out(tree, attn, "head.proj", out)
    _norm(tree, "MAPHead_0/LayerNorm_0", "head.norm", out)
    _linear(tree, "MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1", out)
    _linear(tree, "MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2", out)


def vision_to_native(
    params: dict[str, Tensor], root: str = VISION_ROOT
) -> tuple[dict[str, Tensor], list[str]]:
    """The image tower under ``root`` -> our keys, plus the keys under ``root`` that mapped to nothing.

    A 4-d patch kernel is a ``Conv`` (fixed resolution); a 2-d one is the ``Dense`` of a NaFlex tower
    over flattened (row, column, channel) patches, kept as a (D, p*p*C) ``Linear`` weight."""
    tree = {k[len(root) :]: v for k, v in params.items() if k.startswith(root)}
    out: dict[str, Tensor] = {}
    kernel = tree.pop("embedding/kernel")
    out["patch_embed.weight"] = kernel.permute(3, 2, 0, 1) if kernel.dim() == 4 else kernel.t()
    out["patch_embed.bias"] = tree.pop("embedding/bias")
    pos = tree.pop("pos_embedding")
    out["pos_embed"] = pos.reshape(-1, pos.shape[-1])  # (1, N, D) -> (N, D)
    _encoder(tree, "Transformer", out)
    if "MAPHead_0/probe" in tree:
        _map_head(tree, out)
    return out, [root + k for k in tree]


def text_to_native(params: dict[str, Tensor], root: str = TEXT_ROOT) -> tuple[dict[str, Tensor], list[str]]:
    """The text tower under ``root`` -> our keys, plus the keys under ``root`` that mapped to nothing."""
    tree = {k[len(root) :]: v for k, v in params.items() if k.startswith(root)}
    out: dict[str, Tensor] = {"token_embed.weight": tree.pop("Embed_0/embedding")}
    pos = tree.pop("pos_embedding")
    out["pos_embed"] = pos.reshape(-1, pos.shape[-1])
    _encoder(tree, "Encoder_0", out)
    _linear(tree, "head", "head", out)
    return out, [root + k for k in tree]


def siglip_to_native(params: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Both towers, t' and b of a two-tower SigLIP tree -> our ``SiglipModel`` keys, plus leftovers."""
    vision, left_v = vision_to_native(params)
    text, left_t = text_to_native(params)
    out = {f"vision.{k}": v for k, v in vision.items()}
    out.update({f"text.{k}": v for k, v in text.items()})
    out["logit_scale"] = params["params/t"].reshape(1).float()
    out["logit_bias"] = params["params/b"].reshape(1).float()
    known = (VISION_ROOT, TEXT_ROOT, "params/t", "params/b")
    leftover = left_v + left_t + [k for k in params if not k.startswith(known)]
    return out, leftover


# ----------------------------------------------------------------------------- configs from shapes
def heads_of(params: dict[str, Tensor], root: str, encoder: str) -> int:
    """Number of heads: the middle axis of the first block's query kernel (D, H, hd)."""
    for key in (
        f"{root}{encoder}/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
        # scan: (depth, D, H, hd)
        f"{root}{encoder}/encoderblock/MultiHeadDotProductAttention_0/query/kernel",
    ):
        if key in params:
            return int(params[key].shape[-2])
    raise KeyError(f"no query kernel under {root}{encoder}/ to read the number of heads from")


def _image_tower(params: dict[str, Tensor], sd: dict[str, Tensor], root: str) -> dict[str, Any]:
    """The config fields both image-tower configs read the same way from the shapes."""
    return dict(
        hidden_size=sd["patch_embed.weight"].shape[0],
        intermediate_size=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth_of(sd),
        num_attention_heads=heads_of(params, root, "Transformer"),
        layer_norm_eps=EPS,
        hidden_act=ACT,
        use_head="head.probe" in sd,
    )


def vision_config(params: dict[str, Tensor], sd: dict[str, Tensor], root: str = VISION_ROOT) -> VisionConfig:
    """A fixed-resolution tower's config from its tree (for the heads) and its weights in our layout."""
    weight = sd["patch_embed.weight"]  # (D, C, p, p)
    side = round(sd["pos_embed"].shape[0] ** 0.5)
    return VisionConfig(
        image_size=side * weight.shape[-1],
        patch_size=weight.shape[-1],
        num_channels=weight.shape[1],
        **_image_tower(params, sd, root),
    )


def naflex_config(
    params: dict[str, Tensor], sd: dict[str, Tensor], root: str = VISION_ROOT
) -> NaFlexVisionConfig:
    """A NaFlex tower's config: its ``Dense`` patch embedding takes p*p*3 values (RGB patches)."""
    patch_dim = sd["patch_embed.weight"].shape[1]  # (D, p*p*C)
    patch = math.isqrt(patch_dim // 3)
    if 3 * patch * patch != patch_dim:
        raise ValueError(f"NaFlex patch embedding of {patch_dim} inputs is not p*p*3 for any patch size p")
    return NaFlexVisionConfig(
        num_patches=sd["pos_embed"].shape[0], patch_size=patch, **_image_tower(params, sd, root)
    )


def text_config(params: dict[str, Tensor], sd: dict[str, Tensor], root: str = TEXT_ROOT) -> TextConfig:
    return TextConfig(
        num_attention_heads=heads_of(params, root, "Encoder_0"),
        layer_norm_eps=EPS,
        hidden_act=ACT,
        **text_shape(sd),
    )


def siglip_config(params: dict[str, Tensor], sd: dict[str, Tensor]) -> SiglipConfig:
    return SiglipConfig(vision_config(params, part(sd, "vision.")), text_config(params, part(sd, "text.")))


# ----------------------------------------------------------------------------- the format
def npz_file(path: Path) -> Path | None:
    """The big_vision ``.npz`` that ``path`` is, or the only one in a folder without other weights."""
    if path.suffix == ".npz":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        found = sorted(path.glob("*.npz"))
        if len(found) == 1:
            return found[0]
    return None


def open_weights(path: Path, vision_only: bool) -> dict[str, Tensor] | None:
    """The arrays of the ``.npz`` at ``path`` (only the image tower's if ``vision_only``), else None."""
    npz = npz_file(path)
    if npz is None:
        return None
    with np.load(npz, allow_pickle=False) as f:
        root = tower_root(list(f.files)) or ""
    keep_root = root if vision_only else ""
    return read_npz(npz, keep=lambda k: k.startswith(keep_root))


def read_vision(files: Files, source: str) -> Read:
    params = files.state_dict
    root = tower_root(list(params)) or ""
    native, leftover = vision_to_native(params, root)
    make = naflex_config if native["patch_embed.weight"].dim() == 2 else vision_config
    return native, with_source(make, params, native, root), leftover


def read_siglip(files: Files, source: str) -> Read:
    params = files.state_dict
    if tower_root(list(params)) != VISION_ROOT or TEXT_ROOT + "head/kernel" not in params:
        raise CheckpointError(
            f"{source}: a two-tower big_vision tree has {VISION_ROOT}, {TEXT_ROOT} "
            f"and params/t, params/b; for the image tower alone use VisionTower.from_pretrained"
        )
    if params[VISION_ROOT + "embedding/kernel"].dim() == 2:
        raise CheckpointError(f"{source} holds a SigLIP 2 NaFlex image tower: load it with NaFlexVisionTower")
    native, leftover = siglip_to_native(params)
    return native, with_source(siglip_config, params, native), leftover


FORMAT = register_format(
    Format(
        "big_vision",
        where="big_vision .npz parameter trees (the published SigLIP / SigLIP 2 checkpoints)",
        looks_for="'<root>/embedding/kernel' in an .npz (root 'params/img/')",
        detect=lambda keys: tower_root(list(keys)) is not None,
        read_vision=read_vision,
        read_siglip=read_siglip,
        open_weights=open_weights,
    )
)
