"""The SigLIP image tower, usable as a patch-feature extractor."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, build_and_load
from .config import NaFlexVisionConfig, VisionConfig
from .hardware import choose_precision
from .layers import AttentionPoolHead, Encoder, init_encoder_weights
from .loading import Weights, read_vision_weights, vision_weights_from_state_dict
from .saving import DEFAULT_FORMAT, write_vision_weights


class TowerOutput(NamedTuple):
    """What the tower returns.

    ``patch_features`` (B, N, D) are the tokens of ``feature_layer``; ``grid`` is the (h, w)
    token grid with N = h * w; ``pooled`` (B, D) is the attention-pooling head's output, or
    ``None`` without head; ``hidden_states`` (embeddings, then every block's output) only when
    asked for.
    """

    patch_features: torch.Tensor
    grid: tuple[int, int]
    pooled: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square (N, D) position table to ``grid`` = (h, w) tokens.

    Same numerics as transformers' ``SiglipVisionEmbeddings.interpolate_pos_encoding``: bicubic,
    ``align_corners=False``, computed in the table's dtype.
    """
    n, dim = pos_embed.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table of {n} entries is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    table = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    table = F.interpolate(table, size=tuple(grid), mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], dim)  # (h*w, D)


def add_trunk(tower: nn.Module, config: VisionConfig | NaFlexVisionConfig) -> None:
    """What every SigLIP image tower has after its patch and position embeddings: the pre-norm blocks
    (``encoder``), the post-layernorm (``norm``) and the attention-pooling ``head`` (None without one)."""
    dim = config.hidden_size
    tower.encoder = Encoder.from_config(config)
    tower.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
    tower.head = (
        AttentionPoolHead(
            dim,
            config.num_attention_heads,
            config.intermediate_size,
            config.hidden_act,
            config.layer_norm_eps,
        )
        if config.use_head
        else None
    )


class ImageTowerBase(nn.Module):
    """What the fixed-resolution and the NaFlex image towers share once their patches are embedded: the
    trunk (:func:`add_trunk`), ``feature_layer`` and the forward through blocks, post-norm and head.

    ``feature_layer`` picks the tokens returned as ``patch_features``: -1 (default) is the final
    output after the post-layernorm (transformers' ``last_hidden_state``, what PaliGemma feeds
    its projector); any other k is the raw output of that block, as transformers'
    ``hidden_states[k]`` (0 = embeddings, -2 = the block before last, the LLaVA convention).
    Blocks above it are not computed unless the head needs them for ``pooled``.
    """

    config: VisionConfig | NaFlexVisionConfig
    pos_embed: nn.Parameter
    encoder: Encoder
    norm: nn.LayerNorm
    head: AttentionPoolHead | None

    @property
    def feature_layer(self) -> int:
        return self._feature_layer

    @feature_layer.setter
    def feature_layer(self, k: int) -> None:
        depth = self.config.num_hidden_layers
        if not -(depth + 1) <= k <= depth:
            raise ValueError(
                f"feature_layer={k} is out of range for a tower of {depth} blocks: "
                f"use -1 (final, post-layernorm) or a block index in [{-(depth + 1)}, {depth}]"
            )
        self._feature_layer = k

    @property
    def num_blocks_for_features(self) -> int:
        """How many blocks produce ``patch_features``."""
        k, depth = self.feature_layer, self.config.num_hidden_layers
        if k == -1:
            return depth
        return k if k >= 0 else depth + 1 + k

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_encoder_weights(self)
        nn.init.normal_(self.pos_embed, std=1.0 / math.sqrt(self.config.hidden_size))

    def run_trunk(
        self,
        x: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """Embedded tokens (B, N, D) -> (``feature_layer``'s tokens, the head's pooled output or None, the
        hidden states if asked for). ``attn_mask`` goes to every block, ``key_mask`` (B, N) to the head."""
        hidden = [x] if output_hidden_states else None
        k = self.num_blocks_for_features
        needs_final = self.feature_layer == -1 or self.head is not None
        stop = self.config.num_hidden_layers if needs_final or output_hidden_states else k
        x = self.encoder(x, attn_mask=attn_mask, end=k, hidden_states=hidden)  # (B, N, D)
        features = x
        x = self.encoder(x, attn_mask=attn_mask, start=k, end=stop, hidden_states=hidden)
        pooled = None
        if needs_final:
            final = self.norm(x)  # (B, N, D)
            if self.feature_layer == -1:
                features = final
            if self.head is not None:
                pooled = self.head(final, key_mask=key_mask)  # (B, D)
        return features, pooled, tuple(hidden) if hidden is not None else None


class VisionTower(ImageTowerBase):
    """SigLIP ViT: patch conv, learned positions, pre-norm blocks, post-norm, optional MAP head
    (``feature_layer``: see :class:`ImageTowerBase`)."""

    def __init__(self, config: VisionConfig, *, feature_layer: int = -1) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(config.num_patches, dim))
        add_trunk(self, config)
        self.feature_layer = feature_layer
        self.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameters (besides biases and norms) that training should not decay: the position table."""
        return {"pos_embed"}

    # ----------------------------------------------------------------- forward
    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Patch + position embeddings, (B, 3, H, W) -> (B, N, D); pixels past the last whole patch are
        dropped, as by transformers' strided convolution (384 px in 14 px patches: 27 a side)."""
        _, _, H, W = pixel_values.shape
        p = self.config.patch_size
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, h, w)
        grid = (H // p, W // p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos_embed
        if grid != (self.config.grid_size,) * 2:
            if not interpolate_pos_encoding:
                raise ValueError(
                    f"tower built for {self.config.image_size}px images got {H}x{W}: load it with "
                    f"image_size={H} (resizes the position table once) or pass interpolate_pos_encoding=True"
                )
            pos = interpolate_pos_embed(pos, grid)
        return x + pos

    def forward(
        self,
        pixel_values: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> TowerOutput:
        """(B, 3, H, W) pixels -> :class:`TowerOutput`."""
        p = self.config.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        x = self.embed(pixel_values, interpolate_pos_encoding)  # (B, N, D)
        features, pooled, hidden = self.run_trunk(x, output_hidden_states=output_hidden_states)
        return TowerOutput(features, grid, pooled, hidden)

    # ----------------------------------------------------------------- checkpoints
    @classmethod
    def from_preset(cls, name: str, *, feature_layer: int = -1, **overrides) -> VisionTower:
        """A randomly initialised tower of a registered preset (``tiny``, ``so400m_p14_384``, ...)."""
        from .presets import get_preset

        config = get_preset(name).vision
        if overrides:
            config = VisionConfig.from_dict({**config.to_dict(), **overrides})
        return cls(config, feature_layer=feature_layer)

    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        image_size: int | None = None,
        feature_layer: int = -1,
        use_head: bool | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> VisionTower:
        """Load the image tower from a folder, a ``.safetensors`` file or a hub repo id.

        The layout (transformers SigLIP / SigLIP 2 / PaliGemma in 4.x and 5.x keys, timm,
        open_clip, big_vision ``.npz``) is detected from the keys. ``image_size`` resizes the position table
        once (written by
        ``save_pretrained``); ``use_head=False`` drops the pooling head; loading is strict.
        ``dtype="auto"`` picks bf16 where ``device`` runs it natively (CUDA, CPUs with AMX or
        AVX512-BF16), fp32 elsewhere: see :func:`vision_tower.hardware.choose_precision`.
        """
        if isinstance(dtype, str):
            dtype = choose_precision(dtype, device).dtype
        weights = read_vision_weights(src, use_head=use_head, revision=revision, cache_dir=cache_dir)
        tower = cls.from_weights(weights, image_size=image_size, feature_layer=feature_layer, dtype=dtype)
        return tower.to(device=device)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        config: dict | None = None,
        *,
        source: str = "state dict",
        image_size: int | None = None,
        feature_layer: int = -1,
        use_head: bool | None = None,
        dtype: torch.dtype | None = None,
        copy: bool = True,
    ) -> VisionTower:
        """A tower from an in-memory checkpoint state dict in any supported layout (e.g. a transformers
        ``SiglipVisionModel``'s ``state_dict()``) and its config dict (``config.to_dict()``), strictly.
        ``copy=False`` lets the tower share the given tensors (when the caller drops them)."""
        weights = vision_weights_from_state_dict(state_dict, config, source=source, use_head=use_head)
        return cls.from_weights(
            weights, image_size=image_size, feature_layer=feature_layer, dtype=dtype, copy=copy
        )

    @classmethod
    def from_weights(
        cls,
        weights: Weights,
        *,
        image_size: int | None = None,
        feature_layer: int = -1,
        dtype: torch.dtype | None = None,
        copy: bool = False,
    ) -> VisionTower:
        """Build on the meta device and put ``weights`` in place strictly, in ``dtype``; resize the position
        table if asked (in the checkpoint's precision, before the cast)."""
        if isinstance(weights.config, NaFlexVisionConfig):
            raise CheckpointError(
                f"{weights.source} is a SigLIP 2 NaFlex (variable-resolution) image tower, which this "
                f"fixed-resolution VisionTower cannot run: load it with vision_tower.NaFlexVisionTower"
            )
        resize = image_size is not None and image_size != weights.config.image_size
        tower = build_and_load(
            lambda: cls(weights.config, feature_layer=feature_layer),
            weights.state_dict,
            source=weights.source,
            ignored=weights.ignored,
            dtype=None if resize else dtype,
            copy=copy,
        )
        if resize:
            tower.resize_pos_embed(image_size)
            tower.to(dtype=dtype)
        return tower

    @torch.no_grad()
    def resize_pos_embed(self, image_size: int) -> None:
        """Resize the position table for ``image_size`` px images (image_size // patch_size tokens a side)."""
        p = self.config.patch_size
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int)
            or image_size < p
            or image_size % p
        ):
            near = (
                sorted({max(p, image_size // p * p), (image_size // p + 1) * p})
                if isinstance(image_size, int)
                else [p]
            )
            raise ValueError(
                f"image_size {image_size!r} is not a positive multiple of the patch size {p} (a tower "
                "resized "
                "to it would ignore the pixels past the last whole patch): use e.g. "
                f"{' or '.join(map(str, near))}"
            )
        grid = (image_size // p, image_size // p)
        table = interpolate_pos_embed(self.pos_embed.data, grid)
        self.pos_embed = nn.Parameter(table.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.config.image_size = image_size

    def save_pretrained(self, out_dir: str | os.PathLike, format: str = DEFAULT_FORMAT) -> None:
        """Write transformers' ``SiglipVisionModel`` layout (config.json + model.safetensors), or timm's
        (``format="timm"``: model.safetensors + config.json that ``timm.create_model`` reads)."""
        write_vision_weights(self.config, self.state_dict(), out_dir, format=format)
