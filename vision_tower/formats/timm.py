"""timm ``VisionTransformer`` SigLIP layout <-> this package's layout, as pure functions.

timm keeps the same fused ``qkv`` and split ``q``/``kv`` pooling projections as this package, so
the state-dict map is a rename plus a ``(1, N, D)`` position table. What the weights do not say
(number of heads, GELU variant, pooling) comes from the architecture name: ``config.json`` names
one (``architecture``) and may override its arguments (``model_args``). :data:`TIMM_ARCHS` holds
the SigLIP architectures timm registers; :func:`register_timm_arch` adds your own. timm holds the
image tower only: the registered :data:`FORMAT` reads and writes ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, write_safetensors
from ..config import NaFlexVisionConfig, VisionConfig
from .keys import OUR_BLOCK, depth_of, rename
from .registry import Files, Format, OutDir, Read, StateDict, register_format, with_source

Tensor = torch.Tensor

# (timm module path, our module path); parameters keep their ``.weight`` / ``.bias`` suffix.
_TOWER = [
    ("patch_embed.proj", "patch_embed"),
    ("norm", "norm"),
    ("attn_pool.latent", "head.probe"),
    ("attn_pool.q", "head.q"),
    ("attn_pool.kv", "head.kv"),
    ("attn_pool.proj", "head.proj"),
    ("attn_pool.norm", "head.norm"),
    ("attn_pool.mlp.fc1", "head.mlp.fc1"),
    ("attn_pool.mlp.fc2", "head.mlp.fc2"),
]
_BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# timm's names for the two GELUs <-> the names our configs (and transformers) use
_ACT_FROM_TIMM = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_ACT_TO_TIMM = {v: k for k, v in _ACT_FROM_TIMM.items()}


def _block_part(rest: str) -> bool:
    return any(rest == p or rest.startswith(p + ".") for p in _BLOCK_PARTS)


def vision_to_native(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """timm ``VisionTransformer`` keys (no prefix) -> ours, plus the keys that matched nothing."""
    out: dict[str, Tensor] = {}
    leftover: list[str] = []
    for key, value in sd.items():
        m = _TIMM_BLOCK.match(key)
        if m and _block_part(m.group(2)):
            out[f"encoder.blocks.{m.group(1)}.{m.group(2)}"] = value
        elif key == "pos_embed":
            out["pos_embed"] = value.reshape(-1, value.shape[-1])  # (1, N, D) -> (N, D)
        else:
            new = rename(key, _TOWER, reverse=False)
            if new is None:
                leftover.append(key)
            else:
                out[new] = value
    return out, leftover


def vision_from_native(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our image-tower keys -> timm ``VisionTransformer`` keys."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = OUR_BLOCK.match(key)
        if m:
            out[f"blocks.{m.group(1)}.{m.group(2)}"] = value
        elif key == "pos_embed":
            out["pos_embed"] = value[None]  # (N, D) -> (1, N, D)
        else:
            new = rename(key, _TOWER, reverse=True)
            if new is None:
                raise KeyError(f"no timm name for parameter {key!r}")
            out[new] = value
    return out


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class TimmArch:
    """What a timm architecture name fixes about a SigLIP image tower."""

    patch_size: int
    hidden_size: int
    depth: int
    heads: int
    intermediate_size: int
    image_size: int
    hidden_act: str  # "gelu" (timm's default nn.GELU) or "gelu_pytorch_tanh" (act_layer="gelu_tanh")
    use_head: bool  # attention-pooling ("map") head; the "_gap" variants have none


TIMM_ARCHS: dict[str, TimmArch] = {}


def register_timm_arch(name: str, arch: TimmArch) -> None:
    """Make a timm architecture name known (for reading its config.json and for writing towers as it)."""
    if name in TIMM_ARCHS and TIMM_ARCHS[name] != arch:
        raise ValueError(f"timm architecture {name!r} is already registered as {TIMM_ARCHS[name]}")
    TIMM_ARCHS[name] = arch


_EXACT, _TANH = "gelu", "gelu_pytorch_tanh"
# family -> (patch, width, depth, heads, mlp, {image size: GELU} with the attention-pooling head,
#            {image size: GELU} of the "_gap" variant without it), as registered in timm 1.0
_FAMILIES = {
    "vit_base_patch16_siglip": (16, 768, 12, 12, 3072, dict.fromkeys((224, 256, 384, 512), _EXACT), None),
    "vit_base_patch32_siglip": (32, 768, 12, 12, 3072, {256: _TANH}, None),
    "vit_large_patch16_siglip": (16, 1024, 24, 16, 4096, {256: _EXACT, 384: _EXACT, 512: _TANH}, None),
    "vit_so400m_patch14_siglip": (
        14, 1152, 27, 16, 4304,
        dict.fromkeys((224, 378, 384), _EXACT),
        dict.fromkeys((224, 378, 384, 448, 896), _EXACT),
    ),
    "vit_so400m_patch16_siglip": (16, 1152, 27, 16, 4304, dict.fromkeys((256, 384, 512), _TANH), None),
    "vit_giantopt_patch16_siglip": (16, 1536, 40, 16, 6144, dict.fromkeys((256, 384), _TANH), None),
}  # fmt: skip
for _family, (_p, _w, _d, _h, _m, _map, _gap) in _FAMILIES.items():
    for _size, _act in _map.items():
        register_timm_arch(f"{_family}_{_size}", TimmArch(_p, _w, _d, _h, _m, _size, _act, True))
    for _size, _act in (_gap or _map).items():
        register_timm_arch(f"{_family}_gap_{_size}", TimmArch(_p, _w, _d, _h, _m, _size, _act, False))


def get_timm_arch(name: str) -> TimmArch:
    if name not in TIMM_ARCHS:
        raise KeyError(
            f"timm architecture {name!r} is not a known SigLIP tower; known: {sorted(TIMM_ARCHS)} "
            f"(vision_tower.formats.timm.register_timm_arch adds one)"
        )
    return TIMM_ARCHS[name]


def arch_for(config: VisionConfig, *, any_size: bool = False) -> str | None:
    """The registered timm architecture that builds exactly this tower (at any image size if
    ``any_size``), if there is one."""
    want = TimmArch(
        config.patch_size,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
        config.image_size,
        config.hidden_act,
        config.use_head,
    )
    for name, arch in sorted(TIMM_ARCHS.items()):
        if arch == want or (any_size and arch == replace(want, image_size=arch.image_size)):
            return name
    return None


# ----------------------------------------------------------------------------- config.json
def _act(name: Any, where: str) -> str:
    if name not in _ACT_FROM_TIMM:
        raise ValueError(
            f"{where}: act_layer {name!r} is not supported; SigLIP towers use {sorted(_ACT_FROM_TIMM)}"
        )
    return _ACT_FROM_TIMM[name]


def _size(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) == 3:  # input_size (C, H, W)
            value = value[1:]
        if value[0] != value[1]:
            raise ValueError(f"image size {value!r}: only square towers are supported")
        value = value[0]
    return int(value)


def vision_config(config: dict[str, Any] | None, sd: dict[str, Tensor], source: str) -> VisionConfig:
    """Our config for a timm tower from its ``config.json`` (``architecture``, ``model_args``) and its
    weights (already in our layout): shapes give the widths, the architecture the heads and GELU."""
    config = config or {}
    name = config.get("architecture")
    if name is None:
        raise ValueError(f"{source}: a timm checkpoint needs its config.json (with 'architecture') beside it")
    arch = get_timm_arch(name)
    args = dict(config.get("model_args") or {})
    for key in (
        "class_token",
        "no_embed_class",
        "reg_tokens",
        "fc_norm",
        "pre_norm",
        "qk_norm",
        "init_values",
    ):
        if args.get(key):
            raise ValueError(f"{source}: model_args {key}={args[key]!r} is not part of a SigLIP tower")
    width = sd["patch_embed.weight"].shape[0]
    patch = sd["patch_embed.weight"].shape[-1]
    grid = round(sd["pos_embed"].shape[0] ** 0.5)
    size = args.get("img_size") or (config.get("pretrained_cfg") or {}).get("input_size") or arch.image_size
    size = _size(size)
    if size // patch != grid:  # a resized position table without a matching config: trust the weights
        size = grid * patch
    return VisionConfig(
        hidden_size=width,
        intermediate_size=sd["encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth_of(sd),
        num_attention_heads=int(args.get("num_heads", arch.heads)),
        image_size=size,
        patch_size=patch,
        num_channels=sd["patch_embed.weight"].shape[1],
        layer_norm_eps=1e-6,
        hidden_act=_act(args["act_layer"], source) if "act_layer" in args else arch.hidden_act,
        use_head="head.probe" in sd,
    )


def mlp_ratio(hidden: int, intermediate: int) -> float:
    """A ratio r with ``int(hidden * r) == intermediate`` (how timm and open_clip size their MLPs)."""
    ratio = intermediate / hidden
    return ratio if int(hidden * ratio) == intermediate else (intermediate + 0.5) / hidden


def timm_config(config: VisionConfig) -> dict[str, Any]:
    """The ``config.json`` timm writes for a SigLIP tower: the architecture plus every argument that
    rebuilds this exact shape, and the preprocessing (``pretrained_cfg``)."""
    # the architecture of this shape (at another size if need be); else a SigLIP one that model_args reshape
    name = arch_for(config) or arch_for(config, any_size=True)
    name = name or ("vit_base_patch16_siglip_224" if config.use_head else "vit_base_patch16_siglip_gap_224")
    size = config.image_size
    args = {
        "img_size": size,
        "patch_size": config.patch_size,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": mlp_ratio(config.hidden_size, config.intermediate_size),
        "act_layer": _ACT_TO_TIMM[config.hidden_act],
        "class_token": False,
        "global_pool": "map" if config.use_head else "avg",
        "fc_norm": False,
        "num_classes": 0,  # a tower: no classifier, whatever the architecture's default
    }
    if config.num_channels != 3:
        args["in_chans"] = config.num_channels
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": config.hidden_size,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "custom_load": False,
            "input_size": [config.num_channels, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


# ----------------------------------------------------------------------------- the format
ANCHORS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def read_vision(files: Files, source: str) -> Read:
    native, leftover = vision_to_native(files.state_dict)
    return native, with_source(vision_config, files.config, native, source), leftover


def read_siglip(files: Files, source: str) -> Read:
    raise CheckpointError(
        f"{source} is a timm checkpoint, which holds the image tower only: use VisionTower.from_pretrained"
    )


def write_vision(config: VisionConfig | NaFlexVisionConfig, sd: StateDict, out_dir: OutDir) -> Path:
    """timm's ``model.safetensors`` + ``config.json`` (that ``timm.create_model`` reads)."""
    if isinstance(config, NaFlexVisionConfig):
        raise ValueError("NaFlex towers are written in the transformers layout only (format='transformers')")
    return write_safetensors(vision_from_native(sd), out_dir, timm_config(config))


def write_siglip(config: Any, sd: StateDict, out_dir: OutDir, **options: Any) -> Path:
    raise ValueError(
        "timm checkpoints hold the image tower only: save model.vision with format='timm', "
        "or both towers with format='open_clip'"
    )


FORMAT = register_format(
    Format(
        "timm",
        where="timm/vit_*_siglip_*.* (model.safetensors + config.json with 'architecture')",
        looks_for=" and ".join(repr(k) for k in ANCHORS),
        detect=lambda keys: all(k in keys for k in ANCHORS),
        read_vision=read_vision,
        read_siglip=read_siglip,
        write_vision=write_vision,
        write_siglip=write_siglip,
    )
)
