"""What the tasks that train on shards share: their config's sections and the input check."""

from __future__ import annotations

from typing import Any

from ..data import SampleBuilder, ShardLoader, check_shard_specs, shard_dataset
from ..runner.paths import resolve_path
from ..runner.task import Task


class ShardTask(Task):
    """A task run from a config with ``optim``, ``run`` and ``data`` sections (``data``: ``batch_size``,
    ``train_shards``, ``val_shards``) that writes itself out with ``to_dict``."""

    def __init__(self, cfg: Any) -> None:
        self.cfg, self.optim, self.run = cfg, cfg.optim, cfg.run
        self.micro_batch_size = cfg.data.batch_size

    def check_inputs(self) -> None:
        """Missing or refused shards fail before any set-up, not at the final evaluation."""
        data = self.cfg.data
        check_shard_specs(
            train_shards=resolve_path(data.train_shards),
            val_shards=data.val_shards and resolve_path(data.val_shards),
        )

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def shard_loader(
        self,
        builder: SampleBuilder,
        rank: int,
        world: int,
        resume_state: dict[str, Any] | None,
        skip_limits: dict[str, int] | None = None,
        source: Any = None,
        packer: Any = None,
    ) -> ShardLoader:
        """The endless, resumable stream of ``builder``'s batches over ``data.train_shards`` (or over
        ``source``, a JSON source, when given) for this rank; ``packer``: packed rows
        (:class:`~training.data.packing.RowPacker`)."""
        data = self.cfg.data
        dataset = shard_dataset(
            () if source is not None else resolve_path(data.train_shards),
            builder,
            batch_size=data.batch_size,
            seed=self.run.seed,
            rank=rank,
            world_size=world,
            resampled=True,
            shuffle_buffer=data.shuffle_buffer,
            source=source,
            packer=packer,
        )
        return ShardLoader(
            dataset, num_workers=data.num_workers, resume_state=resume_state, skip_limits=skip_limits
        )
