"""Contrastive losses for two-tower pretraining: SigLIP's sigmoid loss (plain, tiled, multi-rank)
and CLIP's softmax loss for ablations. Imports only torch."""

from .registry import LOSSES, build_loss, get_loss, register_loss
from .sigmoid import SigmoidLoss, clamp_logit_scale, sigmoid_loss
from .softmax import SoftmaxLoss, softmax_loss
from .tiled import DEFAULT_CHUNK_SIZE

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LOSSES",
    "SigmoidLoss",
    "SoftmaxLoss",
    "build_loss",
    "clamp_logit_scale",
    "get_loss",
    "register_loss",
    "sigmoid_loss",
    "softmax_loss",
]
