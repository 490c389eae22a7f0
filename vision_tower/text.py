"""The SigLIP text tower."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .config import TextConfig
from .layers import Encoder, init_encoder_weights


class TextOutput(NamedTuple):
    """``last_hidden_state`` (B, L, D) after the final norm; ``pooled`` (B, P): the last token
    through the head; ``hidden_states`` (embeddings, then every block) only when asked for."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class TextTower(nn.Module):
    """Token + position embeddings, bidirectional pre-norm blocks, final norm, last-token pooling
    and a linear head. SigLIP pads every text to ``max_position_embeddings`` and pools the last
    position, so ``input_ids`` should be padded the same way (see :class:`vision_tower.Tokenizer`)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.token_embed = nn.Embedding(config.vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(config.max_position_embeddings, dim))
        self.encoder = Encoder.from_config(config)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(dim, config.projection_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        init_encoder_weights(self)
        # flax's default embedding init: variance-scaling normal with fan_in = D
        for table in (self.token_embed.weight, self.pos_embed):
            nn.init.normal_(table, std=self.config.hidden_size**-0.5)

    def no_weight_decay(self) -> set[str]:
        """Parameters (besides biases and norms) that training should not decay: the position table."""
        return {"pos_embed"}

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.gradient_checkpointing = enabled

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> TextOutput:
        """(B, L) token ids (and an optional (B, L) 1/0 mask of real tokens) -> :class:`TextOutput`."""
        L = input_ids.shape[-1]
        if L > self.config.max_position_embeddings:
            raise ValueError(
                f"text of {L} tokens is longer than "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        x = self.token_embed(input_ids) + self.pos_embed[:L]  # (B, L, D)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L): keys that may be attended
        hidden = [x] if output_hidden_states else None
        x = self.encoder(x, attn_mask=mask, hidden_states=hidden)
        x = self.norm(x)  # (B, L, D)
        pooled = self.head(x[:, -1])  # (B, P)
        return TextOutput(x, pooled, tuple(hidden) if hidden is not None else None)
