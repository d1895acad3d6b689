"""Evaluation and prediction shards that every process can run.

Each process evaluates (or predicts) its own slice of a split (:class:`~resnet_lit.data.samplers.EvalShardSampler`).
A process whose slice holds no batch leaves the loop while the others wait for it at the next collective (the
metric sync, the agreement on signals): Lightning stops such a run with a traceback, and on NCCL it can hang. That
happens when a split has fewer samples than there are processes, or when a ``limit_*_batches`` fraction rounds a
slice down to zero batches. Both follow from the sizes alone, so every process decides alike and raises the same
error at the same point, before any batch.
"""

from __future__ import annotations

import math

from .errors import DataConfigError
from .samplers import EvalShardSampler


def batches_per_process(size: int, world_size: int, batch_size: int) -> list[int]:
    """The number of batches of each process's slice of a split of ``size`` samples."""
    shards = [len(EvalShardSampler(size, num_replicas=world_size, rank=rank)) for rank in range(world_size)]
    return [math.ceil(shard / batch_size) for shard in shards]


def limited(batches: int, limit: int | float) -> int:
    """Lightning's count of batches run out of ``batches`` under ``limit_*_batches``: a whole number caps the
    count, a fraction scales it and rounds down."""
    if isinstance(limit, float):
        return int(batches * limit)
    return min(batches, int(limit))


def check_eval_shards(
    what: str,
    size: int,
    world_size: int,
    batch_size: int,
    limit_key: str,
    limit: int | float = 1.0,
    noun: str = "sample",
) -> None:
    """Raise a DataConfigError naming ``what`` (e.g. "the val split") and the sizes (counted in ``noun``s) when a
    process would get no batch of it under ``trainer.<limit_key> = limit``.

    An empty split is left alone (every process skips it alike), and so is ``limit == 0`` (switched off).
    """
    if size == 0 or limit == 0:
        return
    if size < world_size:
        raise DataConfigError(
            f"{what} has {size} {noun}(s) for {world_size} processes, and each process needs at least one: add "
            f"{noun}s or run on at most {size} process(es) (trainer.devices x trainer.num_nodes)"
        )
    fewest = min(batches_per_process(size, world_size, batch_size))
    if limited(fewest, limit) == 0:
        raise DataConfigError(
            f"trainer.{limit_key}={limit} leaves a process without a batch of {what}: {limit} x {fewest} batch(es) "
            f"rounds to 0 ({size} {noun}s over {world_size} process(es) in batches of {batch_size}); set "
            f"trainer.{limit_key} to at least {1 / fewest:.4g}, or to a whole number of batches"
        )
