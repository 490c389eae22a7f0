"""ZeRO-3 helpers a task needs around a partitioned model: build partitioned, gather to read or write,
and the consolidated weights of a checkpoint. Below stage 3 each is a plain no-op or copy."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], stage: int, modifier_rank: int | None = None) -> Iterator[None]:
    """Full ZeRO-3 parameters inside the block (written back from ``modifier_rank`` if given).
    Collective at stage 3; a no-op below."""
    if stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


@dataclass
class Zero:
    """The ZeRO setting a task builds, evaluates and exports under."""

    stage: int
    ds_config: dict[str, Any]
    rank: int = 0
    world: int = 1

    def partition(self, module: nn.Module) -> nn.Module:
        """Partition ``module``'s parameters across the ranks now (stage 3; in place), so a model built
        one part at a time never exists whole on a rank. Values come from rank 0."""
        if self.stage == 3:
            import deepspeed

            deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config, mem_efficient_linear=False)
        return module

    def external(self, module: nn.Module, params: list[nn.Parameter]) -> None:
        """At stage 3, gather ``params`` for ``module``'s forward and backward: parameters that ``module``
        reads itself, outside the forward of the sub-module that holds them (a no-op below)."""
        if self.stage == 3:
            import deepspeed

            for param in params:
                deepspeed.zero.register_external_parameter(module, param)

    def init_context(self) -> contextlib.AbstractContextManager:
        """``deepspeed.zero.Init`` at stage 3 (each module is partitioned as it is built), else nothing.
        For models whose own initialisation works under it (transformers' ``_from_config``)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=self.ds_config, mem_efficient_linear=False)

    def gathered(self, params: list[nn.Parameter], modifier_rank: int | None = None):
        return gathered(params, self.stage, modifier_rank)

    def state_dict(
        self, module: nn.Module, keep=lambda name, p: True, *, rank0_only: bool = False
    ) -> dict[str, torch.Tensor]:
        """The parameters ``keep`` accepts and all buffers, in full on CPU, one parameter gathered at a time.
        Collective at stage 3. With ``rank0_only`` the other ranks take part in the gathers but keep no copy
        (an empty dict), so exporting a big frozen decoder does not put a whole copy on every rank."""
        out: dict[str, torch.Tensor] = {}
        copy = not rank0_only or self.rank == 0
        for name, p in module.named_parameters():
            if keep(name, p):
                with self.gathered([p]):
                    if copy:
                        out[name] = p.detach().cpu().clone()
        if copy:
            out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
        return out

    def consolidated_state_dict(
        self, module: nn.Module, checkpoint: Path | None
    ) -> dict[str, torch.Tensor] | None:
        """Every weight of ``module`` in full on rank 0 (None on the others). Trainable parameters come from
        the fp32 master copy in the ZeRO ``checkpoint`` folder (stages 1-3); frozen ones and stage 0 from
        the live module. Collective."""
        from_ckpt = self.stage >= 1 and checkpoint is not None
        live = self.state_dict(
            module, keep=lambda name, p: not (from_ckpt and p.requires_grad), rank0_only=True
        )
        if self.rank != 0:
            return None
        if from_ckpt:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
                live.update(
                    get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
                )
        return live


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
