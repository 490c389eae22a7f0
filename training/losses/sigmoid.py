"""The pairwise sigmoid loss of SigLIP: public function, module with learnable t and b, plain path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._dist import ProcessGroup, resolve_group
from ._inputs import check_pair_inputs
from .registry import register_loss
from .ring import RingSigmoidLoss
from .tiled import DEFAULT_CHUNK_SIZE, GradNeeds, TiledSigmoidLoss, accumulation_dtype


def sigmoid_loss(
    img_emb: torch.Tensor,
    txt_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None,
    *,
    chunk_size: int | str | None = "auto",
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over a batch of B matching image/text pairs.

        L = -(1/B) sum_i sum_j log sigmoid(y_ij * (t * <x_i, y_j> + b)),   y_ij = +1 if i == j else -1

    the normalisation of the paper and big_vision (sum over all B^2 pairs, divided by B).

    Args:
        img_emb, txt_emb: L2-normalised embeddings, (b, D) each; row i of both is a matching pair.
        logit_scale: t' = log t, shaped (1,) like transformers' `SiglipModel.logit_scale`; the loss
            applies `exp`.
        logit_bias: b, shaped (1,); None means b = 0.
        chunk_size: ``"auto"`` (the default) walks the pairs in tiles of side `DEFAULT_CHUNK_SIZE`; an
            int in tiles of that side, with memory O(B * D + chunk_size^2) and the same matmul work
            as the plain path. None computes the plain B x B logits (the reference; on request only:
            at B = 16k it is slower and holds a 1 GiB logit matrix plus its gradient).
        group: process group the batch is split over; None uses the default group when one is
            initialised. With W > 1 ranks each rank passes its local b rows, the text blocks travel
            around a ring (tiled, `chunk_size` or `DEFAULT_CHUNK_SIZE`), and each rank gets the loss of its
            rows
            divided by b, so the mean over ranks is the loss of the global batch. All ranks must
            pass the same b and backpropagate with the same `grad_output` (as `loss.backward()` and
            DeepSpeed loss scaling do). To get a rank-local loss in a multi-rank job, pass a
            one-rank group.

    Returns the 0-dim loss, in fp32 (fp64 for fp64 inputs).
    """
    check_pair_inputs("sigmoid_loss", img_emb, txt_emb, logit_scale, logit_bias, chunk_size)
    group, world_size = resolve_group(group)
    needs = GradNeeds.of(img_emb, txt_emb, logit_scale, logit_bias)
    tile = DEFAULT_CHUNK_SIZE if chunk_size in (None, "auto") else chunk_size
    if world_size > 1:  # the ring is always tiled
        return RingSigmoidLoss.apply(img_emb, txt_emb, logit_scale, logit_bias, tile, group, needs)
    if chunk_size is None:
        return plain_sigmoid_loss(img_emb, txt_emb, logit_scale, logit_bias)
    return TiledSigmoidLoss.apply(img_emb, txt_emb, logit_scale, logit_bias, tile, needs)


def plain_sigmoid_loss(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None
) -> torch.Tensor:
    """The reference path: materialise all B x B logits and let autograd differentiate."""
    acc_dtype = accumulation_dtype(img_emb.dtype)
    scale = logit_scale.to(acc_dtype).reshape(()).exp()
    logits = scale * (img_emb @ txt_emb.T).to(acc_dtype)  # (B, B)
    if logit_bias is not None:
        logits = logits + logit_bias.to(acc_dtype).reshape(())
    logits.diagonal().neg_()  # -y * z: the loss of every pair is softplus(-y z) = -log sigmoid(y z)
    return F.softplus(logits).sum() / img_emb.shape[0]


def clamp_logit_scale(logit_scale: torch.Tensor, logit_scale_max: float | None) -> torch.Tensor:
    """t' clamped to ``logit_scale_max`` (CLIP: ln 100) when that is set, else unchanged."""
    return logit_scale if logit_scale_max is None else logit_scale.clamp(max=logit_scale_max)


class ScalarParamsInFp32(nn.Module):
    """Base for losses with learnable scalars that stay fp32 when the model is cast to bf16/fp16: t'
    (and b where the loss ``learns_bias``) as fp32 parameters shaped (1,), and a forward that feeds them
    to the subclass's ``loss_function``."""

    learns_bias: bool

    def __init__(
        self,
        logit_scale_init: float,
        logit_bias_init: float | None,
        logit_scale_max: float | None,
        chunk_size: int | str | None,
        group: ProcessGroup | None,
    ) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.full((1,), float(logit_scale_init), dtype=torch.float32))
        if self.learns_bias:
            self.logit_bias = nn.Parameter(torch.full((1,), float(logit_bias_init), dtype=torch.float32))
        self.logit_scale_max = logit_scale_max
        self.chunk_size = chunk_size
        self.group = group

    def forward(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        bias = self.logit_bias if self.learns_bias else None
        return self.loss_function(
            img_emb, txt_emb, self.clamped_logit_scale(), bias, chunk_size=self.chunk_size, group=self.group
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for param in self.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    def clamped_logit_scale(self) -> torch.Tensor:
        """t', clamped to ``logit_scale_max`` when that is set."""
        return clamp_logit_scale(self.logit_scale, self.logit_scale_max)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters to leave out of weight decay (timm's convention): all of them."""
        return {name for name, _ in self.named_parameters()}


@register_loss("sigmoid")
class SigmoidLoss(ScalarParamsInFp32):
    """SigLIP loss with its learnable temperature t = exp(t') and bias b.

    `forward(img_emb, txt_emb)` returns `sigmoid_loss(...)` with the module's t' and b. Both are
    fp32 parameters shaped (1,), excluded from weight decay (`no_weight_decay()`); t' is clamped
    to `logit_scale_max` in the forward when given. `chunk_size` as in `sigmoid_loss`: tiled by
    default, plain with None.
    """

    loss_function = staticmethod(sigmoid_loss)
    learns_bias = True
    tiled = True

    def __init__(
        self,
        *,
        logit_scale_init: float = math.log(10.0),
        logit_bias_init: float = -10.0,
        logit_scale_max: float | None = None,
        chunk_size: int | str | None = "auto",
        group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(logit_scale_init, logit_bias_init, logit_scale_max, chunk_size, group)

    def extra_repr(self) -> str:
        return f"logit_scale_max={self.logit_scale_max}, chunk_size={self.chunk_size}"
