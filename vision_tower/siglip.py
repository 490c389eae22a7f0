"""The two-tower SigLIP model with its learnable temperature and bias."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import build_and_load
from .config import SiglipConfig
from .loading import read_siglip_weights
from .saving import DEFAULT_FORMAT, write_siglip_weights
from .text import TextTower
from .vision import VisionTower


class SiglipOutput(NamedTuple):
    """``logits_per_image`` (B_img, B_txt) = t * <img, txt> + b, as transformers' SiglipModel;
    ``logits_per_text`` is its transpose; the embeddings are L2-normalised. With a ``loss_fn``
    the logits are not formed (``None``) and ``loss`` holds its result."""

    logits_per_image: torch.Tensor | None
    logits_per_text: torch.Tensor | None
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss: torch.Tensor | None = None


class SiglipModel(nn.Module):
    """Image tower + text tower + ``logit_scale`` (t' with t = exp(t')) and ``logit_bias`` (b).

    Both scalars are shaped (1,) as in transformers (DeepSpeed cannot partition 0-d parameters)
    and start at t' = ln 10, b = -10 as in the paper.
    """

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.text = TextTower(config.text)
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(config.logit_bias_init)))

    def no_weight_decay(self) -> set[str]:
        """Parameters training should not decay: the temperature t' and the bias b."""
        return {"logit_scale", "logit_bias"}

    def encode_image(self, pixel_values: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) pooled image embeddings (the MAP head's output)."""
        pooled = self.vision(pixel_values).pooled
        if pooled is None:
            raise ValueError("the image tower has no pooling head (use_head=False): no image embedding")
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, normalize: bool = True
    ) -> torch.Tensor:
        """(B, L) token ids -> (B, P) text embeddings."""
        pooled = self.text(input_ids, attention_mask).pooled
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) pair logits t * <img, txt> + b from normalised embeddings."""
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp() + self.logit_bias
        return logits_per_text.t()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
    ) -> SiglipOutput:
        """Embed both sides; then either the pair logits, or ``loss_fn(img, txt, logit_scale, logit_bias)``.

        The loss is computed inside this forward so that sharded training (ZeRO-3) has
        ``logit_scale``/``logit_bias`` gathered while it runs.
        """
        image_embeds = self.encode_image(pixel_values)  # (B_img, D)
        text_embeds = self.encode_text(input_ids, attention_mask)  # (B_txt, D)
        if loss_fn is not None:
            loss = loss_fn(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
            return SiglipOutput(None, None, image_embeds, text_embeds, loss)
        logits_per_image = self.logits(image_embeds, text_embeds)
        return SiglipOutput(logits_per_image, logits_per_image.t(), image_embeds, text_embeds)

    # ----------------------------------------------------------------- construction and checkpoints
    @classmethod
    def from_preset(cls, name: str) -> SiglipModel:
        """A randomly initialised model of a registered preset."""
        from .presets import get_preset

        return cls(get_preset(name))

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> SiglipModel:
        """Load both towers from a folder, file or hub repo id, strictly: transformers ``SiglipModel``,
        open_clip (``open_clip_model.safetensors`` + ``open_clip_config.json``) or big_vision ``.npz``."""
        w = read_siglip_weights(src, revision=revision, cache_dir=cache_dir)
        model = build_and_load(
            lambda: cls(w.config), w.state_dict, source=w.source, ignored=w.ignored, dtype=dtype
        )
        return model.to(device=device)

    def save_pretrained(
        self, out_dir: str | os.PathLike, format: str = DEFAULT_FORMAT, *, allow_gelu_change: bool = False
    ) -> None:
        """Write transformers' ``SiglipModel`` layout (config.json + model.safetensors), or open_clip's
        (``format="open_clip"``: open_clip_model.safetensors + open_clip_config.json; ``allow_gelu_change``
        lets open_clip run the image tower with timm's GELU variant for its shape)."""
        write_siglip_weights(
            self.config, self.state_dict(), out_dir, format=format, allow_gelu_change=allow_gelu_change
        )
