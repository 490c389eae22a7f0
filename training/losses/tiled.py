"""Memory-bounded sigmoid loss: walk the pair matrix in tiles, never holding the B x B logits.

The loss is a scalar, so its gradients are fixed by the forward pass up to the one number
`grad_output`. The forward therefore accumulates the gradient sums tile by tile while the tile is
in cache, and backward only scales them: three matmuls per tile in all (logits, image gradient,
text gradient), the same work as the plain path, instead of four when tiles are recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 2048  # tile side: 2048 x 2048 fp32 is 16 MiB, big enough for full GEMM speed


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class GradNeeds:
    """Which gradients the caller wants; the forward skips the work for the others."""

    img: bool
    txt: bool
    scale: bool
    bias: bool

    @staticmethod
    def of(img, txt, logit_scale, logit_bias) -> GradNeeds:
        on = torch.is_grad_enabled()
        return GradNeeds(
            img=on and img.requires_grad,
            txt=on and txt.requires_grad,
            scale=on and logit_scale.requires_grad,
            bias=on and logit_bias is not None and logit_bias.requires_grad,
        )

    @property
    def image_sums(self) -> bool:
        """The image-side sum also gives d/dt, so it is needed for either."""
        return self.img or self.scale

    @property
    def any(self) -> bool:
        return self.img or self.txt or self.scale or self.bias


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, in place when the dtypes agree (no temporary)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _Workspace:
    """Tile buffers shared by every tile of one block: one allocation per block, not three per tile."""

    def __init__(self, img: torch.Tensor, rows: int, cols: int, chunk_size: int):
        self.acc_dtype = accumulation_dtype(img.dtype)
        self.low_precision = img.dtype != self.acc_dtype
        r, c = min(chunk_size, rows), min(chunk_size, cols)
        opts = {"dtype": self.acc_dtype, "device": img.device}
        self.flat = torch.empty(2, r * c, **opts)  # logits, then sigmoid; per-pair losses
        self.x_scaled = None if self.low_precision else torch.empty(r, img.shape[1], **opts)  # (r, D)
        self.zero = torch.zeros((), **opts)

    def tiles(self, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.flat[0, : r * c].view(r, c), self.flat[1, : r * c].view(r, c)

    def scaled_rows(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """t * x for fp32/fp64 inputs (so one GEMM gives the logits); x itself for bf16/fp16."""
        if self.low_precision:
            return x
        return torch.mul(x, scale, out=self.x_scaled[: x.shape[0]])

    def logits(self, x_scaled, y, scale, bias, out: torch.Tensor) -> torch.Tensor:
        """out = t * x @ y.T + b, (r, c), in the accumulation dtype."""
        if not self.low_precision:
            if bias is None:
                return torch.mm(x_scaled, y.T, out=out)
            return torch.addmm(bias, x_scaled, y.T, out=out)
        out.copy_(x_scaled @ y.T)  # low precision: GEMM in the input dtype, the rest in fp32
        out.mul_(scale)
        return out.add_(bias) if bias is not None else out


def accumulate_block(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    chunk_size: int,
    positives_on_diagonal: bool,
    img_acc: torch.Tensor | None,
    txt_acc: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Visit every pair of `img` (r, D) x `txt` (c, D) once, in `chunk_size` square tiles.

    With z_ij = t <img_i, txt_j> + b, label y_ij = +1 on the diagonal when `positives_on_diagonal`
    and -1 elsewhere, and g_ij = d/dz of -log sigmoid(y z) (= sigmoid(z) - [y = +1]), returns the
    0-dim sums (sum of -log sigmoid(y z), sum of g) and adds, when the buffers are given,
    `img_acc += g @ txt` (r, D) and `txt_acc += g.T @ img` (c, D). Two tile buffers in all.
    """
    rows, cols = img.shape[0], txt.shape[0]
    if positives_on_diagonal and rows != cols:
        raise ValueError(f"a block with positives on its diagonal must be square, got {rows} x {cols}")
    work = _Workspace(img, rows, cols, chunk_size)
    loss_sum = torch.zeros((), dtype=work.acc_dtype, device=img.device)
    grad_sum = torch.zeros((), dtype=work.acc_dtype, device=img.device)
    for i0 in range(0, rows, chunk_size):
        x = img[i0 : i0 + chunk_size]  # (r, D)
        x_scaled = work.scaled_rows(x, scale)  # (r, D)
        for j0 in range(0, cols, chunk_size):
            y = txt[j0 : j0 + chunk_size]  # (c, D)
            z, losses = work.tiles(x.shape[0], y.shape[0])  # (r, c) each
            work.logits(x_scaled, y, scale, bias, out=z)
            on_diagonal = positives_on_diagonal and i0 == j0
            z_pos = z.diagonal().clone() if on_diagonal else None  # (min(r, c),) logits of the pairs
            torch.logaddexp(z, work.zero, out=losses)  # softplus(z) = -log sigmoid(-z), a negative's loss
            if on_diagonal:
                losses.diagonal().copy_(F.softplus(-z_pos))  # -log sigmoid(z) for the positives
            loss_sum += losses.sum()
            g = z.sigmoid_()  # (r, c) dloss/dz of a negative pair, in place of z
            if on_diagonal:
                g.diagonal().copy_(-torch.sigmoid(-z_pos))  # sigmoid(z) - 1 without cancellation
            grad_sum += g.sum()
            if img_acc is None and txt_acc is None:
                continue
            g_in = g.to(img.dtype) if work.low_precision else g
            if img_acc is not None:
                _add_product(img_acc[i0 : i0 + chunk_size], g_in, y)  # (r, D)
            if txt_acc is not None:
                _add_product(txt_acc[j0 : j0 + chunk_size], g_in.T, x)  # (c, D)
    return loss_sum, grad_sum


def scalar_params(logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, acc_dtype):
    """t = exp(t') as a 0-dim tensor and b as a (1,) tensor, detached, in the accumulation dtype."""
    scale = logit_scale.detach().to(acc_dtype).reshape(()).exp()
    bias = None if logit_bias is None else logit_bias.detach().to(acc_dtype).reshape(1)
    return scale, bias


def scaled_grads(ctx, grad_output: torch.Tensor) -> tuple:
    """Backward shared by the tiled and ring functions: scale the sums stored by the forward.

    The stored buffers are scaled in place and handed to autograd, so the backward of one forward
    can run once (as after a plain `loss.backward()`); a second run raises instead of going wrong.
    """
    state = ctx.state
    if state is None:
        raise RuntimeError(
            "the tiled sigmoid loss was backpropagated twice through one forward; its stored gradients "
            "are handed over on the first backward. Recompute the loss, or use chunk_size=None "
            "(plain path) with retain_graph=True"
        )
    ctx.state = None
    g = grad_output.detach().to(state["acc_dtype"]).reshape(())
    n, scale = state["rows"], state["scale"]
    coef = g * scale / n  # d loss / d <x, y> = t g / n

    def as_grad(acc, like):
        if acc is None:
            return None
        return acc.mul_(coef) if acc.dtype == like.dtype else (acc * coef).to(like.dtype)

    grad_img = as_grad(state["img_acc"] if ctx.needs.img else None, state["img_like"])
    grad_txt = as_grad(state["txt_acc"] if ctx.needs.txt else None, state["txt_like"])
    grad_scale = grad_bias = None
    if ctx.needs.scale:  # d/dt' = t * d/dt = t * <X, img_acc> / n
        grad_scale = (
            (state["scale_dot"] * coef).to(state["scale_like"].dtype).reshape(state["scale_like"].shape)
        )
    if ctx.needs.bias:
        grad_bias = (state["grad_sum"] * g / n).to(state["bias_like"].dtype).reshape(state["bias_like"].shape)
    return grad_img, grad_txt, grad_scale, grad_bias


class TiledSigmoidLoss(torch.autograd.Function):
    """Single-process sigmoid loss over tiles; see `sigmoid_loss(..., chunk_size=k)`."""

    @staticmethod
    def forward(ctx, img, txt, logit_scale, logit_bias, chunk_size: int, needs: GradNeeds):
        acc_dtype = accumulation_dtype(img.dtype)
        scale, bias = scalar_params(logit_scale, logit_bias, acc_dtype)
        rows = img.shape[0]
        img_acc = torch.zeros(img.shape, dtype=acc_dtype, device=img.device) if needs.image_sums else None
        txt_acc = torch.zeros(txt.shape, dtype=acc_dtype, device=txt.device) if needs.txt else None
        loss_sum, grad_sum = accumulate_block(
            img,
            txt,
            scale,
            bias,
            chunk_size=chunk_size,
            positives_on_diagonal=True,
            img_acc=img_acc,
            txt_acc=txt_acc,
        )
        keep_for_backward(
            ctx, needs, img, txt, logit_scale, logit_bias, scale, rows, img_acc, txt_acc, grad_sum
        )
        return loss_sum / rows

    @staticmethod
    def backward(ctx, grad_output):
        return (*scaled_grads(ctx, grad_output), None, None)


def keep_for_backward(
    ctx, needs: GradNeeds, img, txt, logit_scale, logit_bias, scale, rows, img_acc, txt_acc, grad_sum
) -> None:
    """``ctx.needs``, and ``ctx.state`` for :func:`scaled_grads` (None when no gradient is needed)."""
    ctx.needs = needs
    ctx.state = (
        make_state(img, txt, logit_scale, logit_bias, scale, rows, img_acc, txt_acc, grad_sum, needs)
        if needs.any
        else None
    )


def make_state(img, txt, logit_scale, logit_bias, scale, rows, img_acc, txt_acc, grad_sum, needs) -> dict:
    """What backward needs: the accumulated sums and the dtypes/shapes of the inputs."""
    scale_dot = None
    if needs.scale:  # sum_ij g_ij <x_i, y_j> = <X, img_acc>, computed while X is at hand
        scale_dot = torch.dot(img.reshape(-1).to(img_acc.dtype), img_acc.reshape(-1))
    return {
        "acc_dtype": img_acc.dtype if img_acc is not None else accumulation_dtype(img.dtype),
        "rows": rows,
        "scale": scale,
        "img_acc": img_acc,
        "txt_acc": txt_acc,
        "grad_sum": grad_sum,
        "scale_dot": scale_dot,
        "img_like": _meta(img),
        "txt_like": _meta(txt),
        "scale_like": _meta(logit_scale),
        "bias_like": _meta(logit_bias),
    }


class _Meta:
    """dtype and shape of a tensor, without keeping the tensor."""

    def __init__(self, t: torch.Tensor):
        self.dtype, self.shape = t.dtype, t.shape


def _meta(t: torch.Tensor | None) -> _Meta | None:
    return None if t is None else _Meta(t)
