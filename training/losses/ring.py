"""Multi-rank sigmoid loss: text embeddings travel around a ring of ranks, no all-gather.

Rank r holds its local b image and text rows. In W steps it meets every rank's text block: at
each step it sends the block it holds to the right, receives the next from the left (overlapped
with the tiles of the current block), and walks the tiles of (local images) x (held texts).
The text-gradient sum of a block travels with the block, one step behind it: each rank adds its
contribution and passes it on, and after W steps it arrives back at the block's owner complete.
So the text gradients go around the ring during the forward, and backward needs no transfer,
only a 2-element check that every rank backpropagates the same `grad_output`.

Per-rank memory is a few (b, D) buffers plus two tiles, whatever W is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._dist import ProcessGroup, check_equal_batches, check_same_scalar, gather_shapes, global_rank
from .tiled import (
    GradNeeds,
    accumulate_block,
    accumulation_dtype,
    keep_for_backward,
    scalar_params,
    scaled_grads,
)

_TAG_TEXT = 7301  # text blocks
_TAG_GRAD = 7302  # text-gradient sums


def _wait(works) -> None:
    for work in works:
        work.wait()


def _exchange(send: torch.Tensor, recv: torch.Tensor, right: int, left: int, group, tag: int):
    """Start sending `send` to the right and receiving `recv` from the left; returns the works."""
    return dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, send, right, group, tag),
            dist.P2POp(dist.irecv, recv, left, group, tag),
        ]
    )


def ring_pass(img, txt, scale, bias, *, chunk_size: int, group, img_acc, carry_txt_grads: bool):
    """Walk local images x every rank's texts; returns (loss sum, grad sum, own text-gradient sum or None)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    right, left = global_rank(group, (me + 1) % world), global_rank(group, (me - 1) % world)
    acc_dtype = accumulation_dtype(img.dtype)
    held = txt.contiguous()  # (b, D) the text block this rank works on now
    text_bufs = [torch.empty_like(held) for _ in range(2)]
    if carry_txt_grads:
        part_bufs = [torch.empty(txt.shape, dtype=acc_dtype, device=txt.device) for _ in range(2)]
        incoming = torch.empty(txt.shape, dtype=acc_dtype, device=txt.device)  # (b, D) sum from the left
    loss_sum = torch.zeros((), dtype=acc_dtype, device=img.device)
    grad_sum = torch.zeros((), dtype=acc_dtype, device=img.device)
    grad_works = []
    for step in range(world):  # at `step`, this rank holds the texts of rank (me - step) % world
        text_works = []
        if step < world - 1:
            text_works = _exchange(held, text_bufs[step % 2], right, left, group, _TAG_TEXT)
        part = part_bufs[step % 2].zero_() if carry_txt_grads else None
        block_loss, block_grad = accumulate_block(
            img,
            held,
            scale,
            bias,
            chunk_size=chunk_size,
            positives_on_diagonal=step == 0,
            img_acc=img_acc,
            txt_acc=part,
        )
        loss_sum += block_loss
        grad_sum += block_grad
        if carry_txt_grads:
            _wait(grad_works)  # the sum for this block from the ranks before us has arrived
            if step > 0:
                part += incoming
            grad_works = _exchange(part, incoming, right, left, group, _TAG_GRAD)
        _wait(text_works)
        if step < world - 1:
            held = text_bufs[step % 2]
    if not carry_txt_grads:
        return loss_sum, grad_sum, None
    _wait(grad_works)  # the last receive is this rank's own block, summed over all ranks
    return loss_sum, grad_sum, incoming


class RingSigmoidLoss(torch.autograd.Function):
    """Per-rank sigmoid loss over the global batch; see `sigmoid_loss(..., group=...)`."""

    @staticmethod
    def forward(
        ctx, img, txt, logit_scale, logit_bias, chunk_size: int, group: ProcessGroup, needs: GradNeeds
    ):
        rows, width = img.shape
        shapes = gather_shapes(group, rows, width, needs.txt, img.device)
        check_equal_batches(shapes)
        acc_dtype = accumulation_dtype(img.dtype)
        scale, bias = scalar_params(logit_scale, logit_bias, acc_dtype)
        img_acc = torch.zeros(img.shape, dtype=acc_dtype, device=img.device) if needs.image_sums else None
        loss_sum, grad_sum, txt_acc = ring_pass(
            img,
            txt,
            scale,
            bias,
            chunk_size=chunk_size,
            group=group,
            img_acc=img_acc,
            carry_txt_grads=any(flag for _, _, flag in shapes),
        )
        ctx.group = group
        keep_for_backward(
            ctx, needs, img, txt, logit_scale, logit_bias, scale, rows, img_acc, txt_acc, grad_sum
        )
        return loss_sum / rows

    @staticmethod
    def backward(ctx, grad_output):
        check_same_scalar(
            grad_output,
            ctx.group,
            "the gradient reaching the multi-rank sigmoid loss (grad_output) differs across ranks; the text "
            "gradients are summed over ranks in the forward and assume every rank scales its loss the same. "
            "Backpropagate the per-rank loss, times one factor shared by all ranks",
        )
        return (*scaled_grads(ctx, grad_output), None, None, None)
