"""The sigmoid loss: tiled path against the plain one and the formula, open_clip parity, module, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from training.losses import (
    DEFAULT_CHUNK_SIZE,
    SigmoidLoss,
    SoftmaxLoss,
    build_loss,
    sigmoid_loss,
    softmax_loss,
)

FP64_TOL = {"rtol": 1e-6, "atol": 1e-12}


def make_batch(rows: int, dim: int, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def run(loss_fn, img, txt, scale: float, bias: float, **kwargs):
    """Loss and gradients wrt (img, txt, t', b), with t' and b shaped (1,)."""
    leaves = [
        img.clone().requires_grad_(),
        txt.clone().requires_grad_(),
        torch.tensor([scale], dtype=img.dtype, requires_grad=True),
        torch.tensor([bias], dtype=img.dtype, requires_grad=True),
    ]
    loss = loss_fn(*leaves, **kwargs)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def formula(img, txt, logit_scale, logit_bias):
    """The definition, written out: -(1/B) sum_ij log sigmoid(y_ij (t <x_i, y_j> + b))."""
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    logits = logit_scale.exp() * img @ txt.T + logit_bias
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def assert_all_close(got, want, **tol):
    for name, g, w in zip(("loss", "img", "txt", "t'", "b"), got, want):
        assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


# (rows, tile): batches that the tile does not divide, a single pair, and one tile bigger than the batch
SIZES = [(1, 4), (7, 3), (7, 16), (513, 128)]
WIDTHS = [1, 3, 64, 1024]
T_B_VALUES = [
    (math.log(10.0), -10.0),  # init
    (math.log(1e4), -10.0),  # very sharp
    (math.log(1e4), 1e3),  # large positive bias
    (-20.0, -1e4),  # t ~ 0, b very negative
]


@pytest.mark.parametrize("rows,tile", SIZES)
@pytest.mark.parametrize("dim", WIDTHS)
def test_tiled_equals_plain_fp64(rows, tile, dim):
    img, txt = make_batch(rows, dim)
    plain = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=None)
    tiled = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=tile)
    assert_all_close(tiled, plain, **FP64_TOL)
    assert_all_close(plain, run(formula, img, txt, math.log(10.0), -10.0), **FP64_TOL)


@pytest.mark.parametrize("rows,tile", [(7, 3), (513, 128)])
@pytest.mark.parametrize("scale,bias", T_B_VALUES)
def test_extreme_temperature_and_bias(rows, tile, scale, bias):
    img, txt = make_batch(rows, 32)
    plain = run(sigmoid_loss, img, txt, scale, bias, chunk_size=None)
    tiled = run(sigmoid_loss, img, txt, scale, bias, chunk_size=tile)
    for value in (*plain, *tiled):
        assert torch.isfinite(value).all()
    assert_all_close(tiled, plain, **FP64_TOL)
    assert_all_close(plain, run(formula, img, txt, scale, bias), **FP64_TOL)
    tiled32 = run(sigmoid_loss, img.float(), txt.float(), scale, bias, chunk_size=tile)
    assert all(torch.isfinite(v).all() for v in tiled32)
    assert_close(tiled32[0].double(), plain[0], rtol=1e-5, atol=1e-6)  # fp32 logits at t = 1e4 lose digits


def test_separated_pairs_give_zero_loss_without_cancellation():
    """Positives at +5000, negatives at -5000: every term is exp(-5000) = 0, so no rounding residue."""
    img = torch.eye(6, dtype=torch.float32)
    for chunk in (None, 4):
        loss, *grads = run(sigmoid_loss, img, img, math.log(1e4), -5e3, chunk_size=chunk)
        assert loss.item() == 0.0
        assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("rows,tile", [(7, 3), (513, 128)])
@pytest.mark.parametrize("dim", [1, 64, 1024])
def test_tiled_equals_plain_fp32(rows, tile, dim):
    img, txt = make_batch(rows, dim, torch.float32)
    plain = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=None)
    tiled = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=tile)
    assert_all_close(tiled, plain)  # torch's fp32 tolerances
    assert tiled[0].dtype == torch.float32


def test_bf16_inputs_accumulate_in_fp32():
    img, txt = make_batch(40, 16, torch.bfloat16)
    plain = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=None)
    tiled = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=16)
    assert tiled[0].dtype == torch.float32 and tiled[1].dtype == torch.bfloat16
    assert_all_close(tiled, plain, rtol=2e-2, atol=1e-3)


def test_grad_output_scales_gradients():
    img, txt = make_batch(9, 8)
    plain = run(lambda *a: 3.0 * sigmoid_loss(*a, chunk_size=None), img, txt, 0.5, -2.0)
    tiled = run(lambda *a: 3.0 * sigmoid_loss(*a, chunk_size=4), img, txt, 0.5, -2.0)
    assert_all_close(tiled, plain, **FP64_TOL)


def test_tiled_keeps_no_pair_matrix_and_backward_runs_once():
    rows, dim = 64, 4
    img, txt = make_batch(rows, dim)
    img.requires_grad_()
    loss = sigmoid_loss(img, txt, torch.zeros(1), torch.zeros(1), chunk_size=16)
    stored = [v for v in loss.grad_fn.state.values() if isinstance(v, torch.Tensor)]
    assert stored and max(t.numel() for t in stored) <= rows * dim  # O(B D), never B^2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def _path(loss: torch.Tensor) -> str:
    """Which path computed `loss`: the tiled autograd Function, or plain autograd ops."""
    return "tiled" if type(loss.grad_fn).__name__ == "TiledSigmoidLossBackward" else "plain"


def test_default_is_the_tiled_path_and_plain_only_on_request():
    img, txt = make_batch(2 * DEFAULT_CHUNK_SIZE + 3, 4, torch.float32)
    img.requires_grad_()
    scale, bias = torch.tensor([1.0]), torch.tensor([-3.0])
    default = sigmoid_loss(img, txt, scale, bias)
    assert _path(default) == "tiled"
    assert _path(sigmoid_loss(img, txt, scale, bias, chunk_size="auto")) == "tiled"
    plain = sigmoid_loss(img, txt, scale, bias, chunk_size=None)
    assert _path(plain) == "plain"
    # the default tiles at DEFAULT_CHUNK_SIZE and keeps no (B, B) matrix for backward
    stored = [v for v in default.grad_fn.state.values() if isinstance(v, torch.Tensor)]
    assert max(t.numel() for t in stored) < img.shape[0] ** 2
    assert_close(default, plain)
    assert_close(default, sigmoid_loss(img, txt, scale, bias, chunk_size=DEFAULT_CHUNK_SIZE), rtol=0, atol=0)
    module = SigmoidLoss()
    assert _path(module(img, txt)) == "tiled"
    assert _path(SigmoidLoss(chunk_size=None)(img, txt)) == "plain"


def test_no_grad_forward_matches():
    img, txt = make_batch(33, 8)
    scale, bias = torch.tensor([1.0]), torch.tensor([-3.0])
    with torch.no_grad():
        tiled = sigmoid_loss(img, txt, scale, bias, chunk_size=8)
    assert_close(tiled, sigmoid_loss(img, txt, scale, bias, chunk_size=None), **FP64_TOL)


def test_missing_bias_means_zero():
    img, txt = make_batch(11, 8)
    scale = torch.tensor([1.5])
    for chunk in (None, 4):
        assert_close(
            sigmoid_loss(img, txt, scale, None, chunk_size=chunk), formula(img, txt, scale, 0.0), **FP64_TOL
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 5])
def test_matches_open_clip(dtype, chunk):
    loss_module = pytest.importorskip("open_clip.loss")
    reference = loss_module.SigLipLoss()
    img, txt = make_batch(23, 16, dtype)
    want = run(lambda x, y, s, b: reference(x, y, s.exp(), b), img, txt, math.log(10.0), -10.0)  # takes t
    got = run(sigmoid_loss, img, txt, math.log(10.0), -10.0, chunk_size=chunk)
    assert_all_close(got, want, **(FP64_TOL if dtype == torch.float64 else {}))


def test_module_parameters():
    loss = SigmoidLoss()
    assert loss.logit_scale.shape == (1,) and loss.logit_bias.shape == (1,)
    assert loss.logit_scale.exp().item() == pytest.approx(10.0)
    assert loss.logit_bias.item() == -10.0
    assert loss.chunk_size == "auto"
    assert loss.no_weight_decay() == {"logit_scale", "logit_bias"}
    loss.to(torch.bfloat16)
    assert loss.logit_scale.dtype == torch.float32 and loss.logit_bias.dtype == torch.float32
    custom = SigmoidLoss(logit_scale_init=0.0, logit_bias_init=0.5, chunk_size=None)
    assert custom.logit_scale.item() == 0.0 and custom.logit_bias.item() == 0.5


def test_module_matches_function_and_clamps():
    img, txt = make_batch(10, 8, torch.float32)
    module = SigmoidLoss(chunk_size=4, logit_scale_max=math.log(5.0))
    assert_close(
        module(img, txt), sigmoid_loss(img, txt, torch.tensor([math.log(5.0)]), torch.tensor([-10.0]))
    )
    module(img, txt).backward()
    assert module.logit_scale.grad.item() == 0.0  # clamped: t' sits above its bound
    assert module.logit_bias.grad.item() != 0.0


def test_registry():
    assert isinstance(build_loss("sigmoid", chunk_size=None), SigmoidLoss)
    assert isinstance(build_loss("softmax"), SoftmaxLoss)
    with pytest.raises(ValueError, match="unknown loss 'sigmoidd'; known losses: sigmoid, softmax"):
        build_loss("sigmoidd")


@pytest.mark.parametrize(
    "img_shape,txt_shape,scale_shape,chunk,match",
    [
        ((4, 3), (5, 3), (1,), None, r"same \(batch, dim\) shape, got \(4, 3\) and \(5, 3\)"),
        ((4,), (4,), (1,), None, r"img_emb must be a \(batch, dim\) tensor, got \(4,\)"),
        ((4, 3), (4, 3), (2,), None, r"logit_scale must be a one-element tensor shaped \(1,\), got \(2,\)"),
        ((4, 3), (4, 3), (1,), 0, "chunk_size must be a positive int, 'auto' or None, got 0"),
        ((4, 3), (4, 3), (1,), "big", "chunk_size must be a positive int, 'auto' or None, got 'big'"),
    ],
)
def test_errors_name_the_problem(img_shape, txt_shape, scale_shape, chunk, match):
    with pytest.raises(ValueError, match=match):
        sigmoid_loss(
            torch.randn(img_shape),
            torch.randn(txt_shape),
            torch.zeros(scale_shape),
            torch.zeros(1),
            chunk_size=chunk,
        )


def test_softmax_loss_matches_infonce():
    img, txt = make_batch(12, 8)
    got = run(softmax_loss, img, txt, math.log(1 / 0.07), 3.0)
    labels = torch.arange(12)

    def reference(x, y, s, b):
        logits = s.exp() * x @ y.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2 + 0 * b.sum()

    assert_all_close(got, run(reference, img, txt, math.log(1 / 0.07), 3.0), **FP64_TOL)
    with pytest.raises(ValueError, match="only the plain path"):
        softmax_loss(img, txt, torch.zeros(1), chunk_size=4)


def test_softmax_matches_open_clip():
    loss_module = pytest.importorskip("open_clip.loss")
    img, txt = make_batch(12, 8)
    want = run(lambda x, y, s, b: loss_module.ClipLoss()(x, y, s.exp()) + 0 * b.sum(), img, txt, 2.0, 0.0)
    assert_all_close(run(softmax_loss, img, txt, 2.0, 0.0), want, **FP64_TOL)
