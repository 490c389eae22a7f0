"""Rank workers for tests/test_loss_distributed.py (spawned processes import them from here)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from training.losses import sigmoid_loss, softmax_loss

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def global_batch(world: int, rows: int, dim: int, dtype: str, seed: int = 0):
    """The same unit-norm global batch, (world * rows, dim) for each tower, on every process."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(
        torch.randn(world * rows, dim, generator=gen, dtype=torch.float64), dim=-1
    )
    txt = torch.nn.functional.normalize(
        torch.randn(world * rows, dim, generator=gen, dtype=torch.float64), dim=-1
    )
    return img.to(DTYPES[dtype]), txt.to(DTYPES[dtype])


def loss_and_grads(loss_fn, img, txt, case: dict, **kwargs) -> dict:
    """Run `loss_fn` on leaf copies of img/txt with the case's t' and b; return loss and all grads."""
    img = img.clone().requires_grad_()
    txt = txt.clone().requires_grad_(case.get("txt_grad", True))
    scale = torch.tensor([case.get("scale", math.log(10.0))], dtype=img.dtype, requires_grad=True)
    bias = torch.tensor([case.get("bias", -10.0)], dtype=img.dtype, requires_grad=True)
    loss = loss_fn(img, txt, scale, bias, **kwargs)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad, "bias": bias.grad}


def _local(tensor: torch.Tensor, rank: int, rows: int) -> torch.Tensor:
    return tensor[rank * rows : (rank + 1) * rows]


def ring_cases_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    """Each case: this rank's rows of the global batch through the loss on the default group."""
    results = []
    for case in cases:
        img, txt = global_batch(world, case["rows"], case["dim"], case["dtype"], case.get("seed", 0))
        loss_fn = softmax_loss if case.get("loss") == "softmax" else sigmoid_loss
        local = (_local(img, rank, case["rows"]), _local(txt, rank, case["rows"]))
        results.append(loss_and_grads(loss_fn, *local, case, chunk_size=case.get("chunk")))
    return results


def subgroup_worker(rank: int, world: int, case: dict) -> dict:
    """Ranks split into two rings of world // 2; each ring computes the loss of its own batch."""
    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    ring, ring_rank = rank // half, rank % half
    img, txt = global_batch(half, case["rows"], case["dim"], case["dtype"], seed=ring)
    local = (_local(img, ring_rank, case["rows"]), _local(txt, ring_rank, case["rows"]))
    return loss_and_grads(sigmoid_loss, *local, case, chunk_size=case.get("chunk"), group=groups[ring])


def misuse_worker(rank: int, world: int) -> dict:
    """The errors every rank must raise: unequal local batches, rank-dependent grad_output."""
    messages = {}
    img, txt = global_batch(world, 8, 4, "float64")
    rows = 8 - rank  # rank 0 has 8 pairs, rank 1 has 7, ...
    scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    bias = torch.tensor([-10.0], dtype=torch.float64)
    try:
        sigmoid_loss(img[:rows], txt[:rows], scale, bias, chunk_size=4)
    except ValueError as err:
        messages["unequal"] = str(err)
    local_img = _local(img, rank, 8).clone().requires_grad_()
    loss = sigmoid_loss(local_img, _local(txt, rank, 8), scale, bias, chunk_size=4)
    try:
        (loss * (rank + 1)).backward()
    except RuntimeError as err:
        messages["grad_output"] = str(err)
    return messages
