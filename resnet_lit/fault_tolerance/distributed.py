"""Small collective helpers shared by the fault-tolerance callbacks (no-ops in a single process)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist


def is_distributed(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def gather_objects(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank. Collective: call it on all ranks."""
    if not is_distributed(trainer):
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def any_rank(trainer: pl.Trainer, flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on at least one. Collective: call it on all ranks."""
    return bool(max_over_ranks(trainer, flag))


def max_over_ranks(trainer: pl.Trainer, value: bool | int | torch.Tensor) -> int:
    """The largest of the ranks' integer ``value`` (e.g. a signal number), on every rank. Collective."""
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(int(value))
    if trainer.world_size > 1:
        value = trainer.strategy.reduce(
            value.to(device=trainer.strategy.root_device, dtype=torch.int64), reduce_op="max"
        )
    return int(value.item())


def host_group(trainer: pl.Trainer) -> Any:
    """A process group for all-reducing host (CPU) values: the default group under gloo, else a new gloo group.

    Collective: call it on all ranks at the same point. Reducing CPU tensors over gloo never waits for the GPU,
    so per-step agreement on host-side flags (e.g. "a signal arrived") costs no device synchronisation.
    """
    if not is_distributed(trainer):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def host_max(trainer: pl.Trainer, value: int, group: Any) -> int:
    """The largest of the ranks' host integer ``value``, reduced over ``group`` (from :func:`host_group`)."""
    if group is None:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())
