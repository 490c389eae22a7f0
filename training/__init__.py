"""Training: the sigmoid loss, the WebDataset pipeline, DeepSpeed pretraining, evaluation, the CLI.

Importing this package does not import DeepSpeed; the engine is set up only when training runs.
"""

from .losses import SigmoidLoss, SoftmaxLoss, build_loss, sigmoid_loss, softmax_loss

__all__ = ["SigmoidLoss", "SoftmaxLoss", "build_loss", "sigmoid_loss", "softmax_loss"]
