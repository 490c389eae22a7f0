"""Process-group helpers shared by the multi-rank losses (torch.distributed only)."""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup if dist.is_available() else object


def resolve_group(group: ProcessGroup | None) -> tuple[ProcessGroup | None, int]:
    """The group a loss spans and its size: `group`, else the default group if one is initialised."""
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size < 1:
        raise ValueError(
            f"this process (rank {dist.get_rank()}) is not a member of the group passed to the loss"
        )
    return group, world_size


def gather_shapes(
    group: ProcessGroup, rows: int, width: int, flag: bool, device: torch.device
) -> list[list[int]]:
    """All ranks' `[rows, width, flag]`, so every rank can check the same things and agree on the plan."""
    mine = torch.tensor([rows, width, int(flag)], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [t.tolist() for t in everyone]


def check_equal_batches(shapes: list[list[int]]) -> None:
    """Raise unless every rank holds the same local batch size and embedding width."""
    rows = [s[0] for s in shapes]
    widths = [s[1] for s in shapes]
    if len(set(rows)) > 1:
        raise ValueError(
            f"local batch sizes differ across ranks: {rows}; the multi-rank loss needs the same number of "
            "pairs on every rank (drop the last partial batch, e.g. drop_last=True)"
        )
    if len(set(widths)) > 1:
        raise ValueError(f"embedding widths differ across ranks: {widths}")


def check_same_scalar(value: torch.Tensor, group: ProcessGroup, message: str) -> None:
    """Raise `message` on every rank if the scalar `value` is not equal on all ranks (one 2-element
    all_reduce)."""
    stats = torch.stack([value.detach().reshape(()), -value.detach().reshape(())]).double()
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    high, low = stats[0].item(), -stats[1].item()
    if high != low:
        raise RuntimeError(f"{message} (min over ranks {low!r}, max {high!r})")


def global_rank(group: ProcessGroup, group_rank: int) -> int:
    """The global rank of member `group_rank` of `group` (P2P ops address global ranks)."""
    return dist.get_global_rank(group, group_rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradients of its block."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)  # (W * b, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(
            grad, group=ctx.group
        )  # all_reduce works on every backend (gloo has no reduce_scatter)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `(b, D)` block into `(W * b, D)`, differentiably."""
    return _AllGatherWithGrad.apply(tensor, group)
