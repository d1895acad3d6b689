"""Small collective helpers shared by the fault-tolerance callbacks (no-ops in a single process), and the
training steps at which they may run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

# Steps between sync steps when Lightning's step logging is off (`log_every_n_steps: 0`): Lightning's default.
SYNC_EVERY_WITHOUT_LOGGING = 50


def is_sync_step(trainer: pl.Trainer, step: int) -> bool:
    """Whether training step `step` may sync the host with the device and run collectives: the steps after which
    Lightning writes the step logs (`step` counts optimizer steps from 1, as `trainer.global_step` does once the
    step is done), which sync anyway. Every `SYNC_EVERY_WITHOUT_LOGGING` steps when step logging is off.

    Per-step work that needs a host sync or a collective (the global `train/loss`, checking the non-finite loss
    flags, time-based checkpoint decisions) waits for these steps, so that the steps in between only queue
    device work. The same on every rank: collectives at these steps cannot deadlock.
    """
    every = trainer.log_every_n_steps or SYNC_EVERY_WITHOUT_LOGGING
    return step % every == 0


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
    so agreeing on host-side flags (e.g. "a signal arrived") costs no device synchronisation, only a network
    round trip through every rank.
    """
    if not is_distributed(trainer):
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def host_max(trainer: pl.Trainer, value: int, group: Any) -> int:
    """The largest of the ranks' host integer ``value``, reduced over ``group`` (from :func:`host_group`)."""
    return host_max_each(trainer, [value], group)[0]


def host_max_each(trainer: pl.Trainer, values: Sequence[int], group: Any) -> list[int]:
    """The largest of the ranks' host integers, element by element, in one all-reduce over ``group``."""
    if group is None:
        return [int(v) for v in values]
    tensor = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def host_barrier(group: Any) -> None:
    """Wait until every rank of ``group`` (from :func:`host_group`) has come here; a no-op without a group."""
    if group is not None:
        dist.barrier(group=group)
