"""Typed configs for the image tower, the text tower and the two-tower SigLIP model.

Field names follow transformers' ``SiglipVisionConfig`` / ``SiglipTextConfig`` so that a
``config.json`` maps onto them one to one; ``to_hf`` / ``from_hf`` do the translation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import JSON_TYPE_NAMES, json_type_fits

ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")

# Keys transformers writes into every config.json that carry no architecture information.
_HF_BOOKKEEPING = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "initializer_factor",
    "initializer_range",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "use_return_dict",
    "torchscript",
    "tie_word_embeddings",
    "is_encoder_decoder",
    "chunk_size_feed_forward",
    "problem_type",
    "id2label",
    "label2id",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "_attn_implementation_autoset",
    "pruned_heads",
    "add_cross_attention",
    "tie_encoder_decoder",
    "is_decoder",
    "cross_attention_hidden_size",
    "finetuning_task",
    "num_image_tokens",
    "projection_dim",
    "projector_hidden_act",
    "sep_token_id",
    "decoder_start_token_id",
    "max_length",
    "min_length",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "attention_probs_dropout_prob",
    "dropout",
    "hidden_dropout_prob",
    "layerdrop",
    "vocab_size_or_config_json_file",
}


def _check_known(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")


def _check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """Each value has its field's type (that of the default; image and patch sizes may be pairs)."""
    for f in dataclasses.fields(cls):
        value, default = data.get(f.name), f.default
        if value is None or default is None or default is dataclasses.MISSING:
            continue
        if f.name in ("image_size", "patch_size") and isinstance(value, list | tuple):
            continue
        if not json_type_fits(value, type(default)):
            raise ValueError(
                f"{where}: field {f.name!r} must be {JSON_TYPE_NAMES.get(type(default))}, found {value!r}"
            )


def _as_int(value: Any, name: str) -> int:
    """transformers allows ``image_size``/``patch_size`` as a pair; SigLIP towers are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name}={value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


@dataclass
class _EncoderConfig:
    """What every transformer encoder config here has (image towers and the text tower), and checks:
    whole heads and a supported GELU."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    attention_dropout: float = 0.0

    def _check_encoder(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose one of {ACTIVATIONS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _TowerConfig(_EncoderConfig):
    """What both image-tower configs share: the ViT's shape, strict dicts and transformers' ``config.json``
    fields."""

    MODEL_TYPE = ""

    patch_size: int = 16
    num_channels: int = 3
    use_head: bool = True

    def _check(self) -> None:
        self.patch_size = _as_int(self.patch_size, "patch_size")
        self._check_encoder()

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Strict: an unknown key, or a value not of its field's type, is an error that names it."""
        _check_known(cls, data, f"{cls.__name__}")
        _check_types(cls, data, f"{cls.__name__}")
        return cls(**data)

    @classmethod
    def from_hf(cls, data: dict[str, Any]):
        """From a transformers vision config dict (missing fields take its defaults)."""
        data = {k: v for k, v in data.items() if k not in _HF_BOOKKEEPING}
        if "vision_use_head" in data:
            data["use_head"] = data.pop("vision_use_head")
        return cls.from_dict(data)

    def to_hf(self) -> dict[str, Any]:
        out = self.to_dict()
        out["vision_use_head"] = out.pop("use_head")
        out["model_type"] = self.MODEL_TYPE
        return out


@dataclass
class VisionConfig(_TowerConfig):
    """The SigLIP ViT image encoder (fixed resolution)."""

    MODEL_TYPE = "siglip_vision_model"

    image_size: int = 224

    def __post_init__(self) -> None:
        self.image_size = _as_int(self.image_size, "image_size")
        self._check()
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class NaFlexVisionConfig(_TowerConfig):
    """The SigLIP 2 NaFlex image encoder: patchified inputs of any aspect ratio, a square table of
    ``num_patches`` learned positions resized to each image's patch grid (transformers'
    ``Siglip2VisionConfig``)."""

    MODEL_TYPE = "siglip2_vision_model"

    num_patches: int = 256

    def __post_init__(self) -> None:
        self._check()
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ValueError(f"num_patches {self.num_patches} is not a square grid of positions")

    @property
    def position_grid(self) -> int:
        """Side of the square position table (16 for 256 positions)."""
        return math.isqrt(self.num_patches)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: patch_size * patch_size * num_channels."""
        return self.patch_size * self.patch_size * self.num_channels


@dataclass
class TextConfig(_EncoderConfig):
    """The SigLIP text encoder (last-token pooling and a linear head)."""

    vocab_size: int = 32000
    max_position_embeddings: int = 64
    projection_size: int | None = None
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self) -> None:
        if self.projection_size is None:
            self.projection_size = self.hidden_size
        self._check_encoder()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        _check_known(cls, data, "text config")
        return cls(**data)

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> TextConfig:
        data = {k: v for k, v in data.items() if k not in _HF_BOOKKEEPING}
        if isinstance(data.get("eos_token_id"), list):
            data["eos_token_id"] = data["eos_token_id"][0]
        return cls.from_dict(data)

    def to_hf(self) -> dict[str, Any]:
        out = self.to_dict()
        out["model_type"] = "siglip_text_model"
        return out


@dataclass
class SiglipConfig:
    """Both towers plus the initial values of the learnable temperature and bias.

    ``logit_scale_init`` is t' (the model stores t' and uses t = exp(t')); the paper starts at
    t' = ln 10, b = -10.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float = -10.0

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig.from_dict(self.text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiglipConfig:
        _check_known(cls, data, "siglip config")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "logit_scale_init": self.logit_scale_init,
            "logit_bias_init": self.logit_bias_init,
        }

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> SiglipConfig:
        return cls(
            vision=VisionConfig.from_hf(data.get("vision_config") or {}),
            text=TextConfig.from_hf(data.get("text_config") or {}),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["SiglipModel"],
            "model_type": "siglip",
            "text_config": self.text.to_hf(),
            "vision_config": self.vision.to_hf(),
        }
