"""CLIP's softmax (InfoNCE) loss behind the sigmoid loss's interface, for the paper's ablation."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._dist import ProcessGroup, all_gather_with_grad, check_equal_batches, gather_shapes, resolve_group
from ._inputs import check_pair_inputs
from .registry import register_loss
from .sigmoid import ScalarParamsInFp32
from .tiled import accumulation_dtype


def softmax_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropy over the batch.

        L = (1/2B) sum_i [ -log softmax_j(z_ij)_i - log softmax_j(z_ji)_i ],   z_ij = t <x_i, y_j> + b

    Arguments as in `sigmoid_loss`; b shifts every logit of a row alike, so it cancels (gradient 0).
    Plain path only (`chunk_size` must be None). With W > 1 ranks the other ranks' embeddings are
    all-gathered (memory grows with W, unlike the sigmoid ring); each rank returns the loss of its
    rows, and the mean over ranks is the global loss.
    """
    check_pair_inputs("softmax_loss", img_emb, txt_emb, logit_scale, logit_bias, chunk_size)
    if chunk_size is not None:
        raise ValueError("softmax_loss has only the plain path; pass chunk_size=None")
    group, world_size = resolve_group(group)
    all_img, all_txt, offset = img_emb, txt_emb, 0
    if world_size > 1:
        check_equal_batches(gather_shapes(group, *img_emb.shape, False, img_emb.device))
        all_img = all_gather_with_grad(img_emb, group)  # (W b, D)
        all_txt = all_gather_with_grad(txt_emb, group)  # (W b, D)
        offset = dist.get_rank(group) * img_emb.shape[0]
    acc_dtype = accumulation_dtype(img_emb.dtype)
    scale = logit_scale.to(acc_dtype).reshape(()).exp()
    bias = 0.0 if logit_bias is None else logit_bias.to(acc_dtype).reshape(())
    img_to_txt = scale * (img_emb @ all_txt.T).to(acc_dtype) + bias  # (b, W b)
    txt_to_img = scale * (txt_emb @ all_img.T).to(acc_dtype) + bias  # (b, W b)
    labels = torch.arange(img_emb.shape[0], device=img_emb.device) + offset  # (b,)
    return (F.cross_entropy(img_to_txt, labels) + F.cross_entropy(txt_to_img, labels)) / 2


@register_loss("softmax")
class SoftmaxLoss(ScalarParamsInFp32):
    """CLIP's softmax loss with a learnable temperature t = exp(t'), init 1/0.07 as in CLIP.

    Same constructor and forward as `SigmoidLoss`, without the bias (it would cancel). t' is an
    fp32 parameter shaped (1,), excluded from weight decay, clamped to `logit_scale_max` (CLIP:
    log 100) in the forward when given.
    """

    loss_function = staticmethod(softmax_loss)
    learns_bias = False  # b shifts every logit of a row alike: it cancels
    tiled = False

    def __init__(
        self,
        *,
        logit_scale_init: float = math.log(1 / 0.07),
        logit_scale_max: float | None = math.log(100.0),
        chunk_size: int | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(logit_scale_init, None, logit_scale_max, chunk_size, group)

    def extra_repr(self) -> str:
        return f"logit_scale_max={self.logit_scale_max}"
