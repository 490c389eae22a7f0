"""transformers SigLIP key layout <-> this package's layout, as pure state-dict functions.

transformers keeps separate q/k/v projections in every block and an ``nn.MultiheadAttention``
(with a packed ``in_proj``) in the pooling head; this package fuses q/k/v into one ``qkv``
projection and splits the head's projection into ``q`` and ``kv``. Everything else is a rename.
Keys here carry no tower prefix (``vision_model.`` / ``text_model.``): callers strip and add it.
"""

from __future__ import annotations

import re

import torch

from ..checkpoint import CheckpointError
from .keys import rename

Tensor = torch.Tensor

# (transformers module path, our module path); parameters keep their ``.weight`` / ``.bias`` suffix.
_BLOCK = [
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
    ("self_attn.out_proj", "attn.proj"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
]
_VISION = [
    ("embeddings.patch_embedding", "patch_embed"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("post_layernorm", "norm"),
    ("head.probe", "head.probe"),
    ("head.attention.out_proj", "head.proj"),
    ("head.layernorm", "head.norm"),
    ("head.mlp.fc1", "head.mlp.fc1"),
    ("head.mlp.fc2", "head.mlp.fc2"),
]
_TEXT = [
    ("embeddings.token_embedding", "token_embed"),
    ("embeddings.position_embedding.weight", "pos_embed"),
    ("final_layer_norm", "norm"),
    ("head", "head"),
]
_HF_BLOCK = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_OUR_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)$")
_QKV = ("q_proj", "k_proj", "v_proj")


def _to_native(sd: dict[str, Tensor], table: list[tuple[str, str]]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename/fuse; returns (native state dict, source keys that matched nothing)."""
    out: dict[str, Tensor] = {}
    leftover: list[str] = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight|bias) -> {q_proj: ...}
    in_proj: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _HF_BLOCK.match(key)
        if m:
            layer, rest = m.groups()
            proj, _, param = rest.removeprefix("self_attn.").partition(".")
            if rest.startswith("self_attn.") and proj in _QKV:
                qkv.setdefault((layer, param), {})[proj] = value
                continue
            new = rename(rest, _BLOCK)
            if new is None:
                leftover.append(key)
            else:
                out[f"encoder.blocks.{layer}.{new}"] = value
        elif key.startswith("head.attention.in_proj_"):
            in_proj[key.removeprefix("head.attention.in_proj_")] = value
        else:
            new = rename(key, table)
            if new is None:
                leftover.append(key)
            else:
                out[new] = value
    for (layer, param), parts in qkv.items():
        if len(parts) != 3:
            leftover.extend(f"encoder.layers.{layer}.self_attn.{p}.{param}" for p in parts)
            continue
        shapes = {p: tuple(parts[p].shape) for p in _QKV}
        if len(set(shapes.values())) > 1:
            raise CheckpointError(
                f"encoder.layers.{layer}.self_attn.{{q,k,v}}_proj.{param} differ in shape ({shapes}): they "
                "cannot be fused into one qkv projection"
            )
        out[f"encoder.blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _QKV], dim=0)
    for param, value in in_proj.items():  # rows ordered q, k, v
        dim = value.shape[0] // 3
        out[f"head.q.{param}"] = value[:dim]
        out[f"head.kv.{param}"] = value[dim:]
    return out, leftover


def _from_native(sd: dict[str, Tensor], table: list[tuple[str, str]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    head_q: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _OUR_BLOCK.match(key)
        if m:
            layer, rest = m.groups()
            if rest.startswith("attn.qkv."):
                param = rest.removeprefix("attn.qkv.")
                for proj, part in zip(_QKV, value.chunk(3, dim=0)):
                    out[f"encoder.layers.{layer}.self_attn.{proj}.{param}"] = part.contiguous()
                continue
            new = rename(rest, _BLOCK, reverse=True)
            key_out = None if new is None else f"encoder.layers.{layer}.{new}"
        elif key.startswith("head.q."):
            head_q[key.removeprefix("head.q.")] = value
            continue
        elif key.startswith("head.kv."):
            continue  # written with head.q below
        else:
            key_out = rename(key, table, reverse=True)
        if key_out is None:
            raise KeyError(f"no transformers name for parameter {key!r}")
        out[key_out] = value.contiguous()
    for param, q in head_q.items():
        out[f"head.attention.in_proj_{param}"] = torch.cat([q, sd[f"head.kv.{param}"]], dim=0)
    return out


def vision_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers ``SiglipVisionTransformer`` keys (no prefix) -> ours, plus unmatched keys."""
    return _to_native(sd, _VISION)


def vision_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return _from_native(sd, _VISION)


def text_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    return _to_native(sd, _TEXT)


def text_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return _from_native(sd, _TEXT)
