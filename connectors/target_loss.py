"""The next-token loss at the answer tokens only: ``lm_head`` (and the family's final soft-capping) on the
hidden states of the positions whose next token is a target, the cross-entropy in chunks of positions so
that no (positions x vocabulary) fp32 tensor is ever whole.

Each chunk's logits are recomputed in the backward pass (a non-reentrant checkpoint) instead of being kept,
so the memory of the loss is one chunk's logits whatever the number of targets; with one chunk there is
nothing to recompute and none is made.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# logits (fp32) per chunk: 2**26 values = 256 MiB, 256 positions of Gemma's 256k vocabulary
CHUNK_VALUES = 1 << 26


def output_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``lm_head`` on ``hidden``, soft-capped as Gemma 2/3 do (``tanh(logits / cap) * cap``)."""
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    return F.cross_entropy(output_logits(head, hidden, softcap).float(), targets, reduction="sum")


def target_loss_sum(
    decoder: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_values: int | None = None
) -> torch.Tensor:
    """Sum of the cross-entropy of ``targets`` (T,) predicted from ``hidden`` (T, H) by ``decoder``'s
    output layer, in fp32, computed ``chunk_values`` (default :data:`CHUNK_VALUES`) // vocabulary positions
    at a time."""
    head = decoder.get_output_embeddings()
    softcap = getattr(decoder.config, "final_logit_softcapping", None)
    vocab = getattr(head.weight, "ds_shape", head.weight.shape)[0]  # ZeRO-3 keeps the full shape there
    step = max(1, (chunk_values or CHUNK_VALUES) // max(1, vocab))
    if hidden.shape[0] <= step:
        return _chunk_sum(head, hidden, targets, softcap)
    total = hidden.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], step):
        h, t = hidden[start : start + step], targets[start : start + step]
        if recompute:
            total = total + checkpoint(_chunk_sum, head, h, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_sum(head, h, t, softcap)
    return total
