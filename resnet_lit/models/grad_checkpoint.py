"""Gradient checkpointing of one block: keep only its input, recompute the rest in the backward pass.

`torch.utils.checkpoint` (non-reentrant, so DDP and `torch.compile` accept it) runs the block's forward a
second time during the backward pass. In training mode that second forward would update every BatchNorm's
running statistics and `num_batches_tracked` a second time; :func:`scratch_norm_statistics` stops that: while
the block is recomputed, its training BatchNorm layers update throwaway copies of those buffers (their output,
normalised with the batch statistics, is the same as in the first pass). Random layers (DropPath, dropout) draw the
same numbers in the recomputation (`preserve_rng_state`), and the recomputation runs on a copy of the random
state, so the random stream, and with it exact resume, is the same as without checkpointing.

Under `torch.compile` the recomputation is the compiler's (AOTAutograd's partitioner recomputes the tagged
region, and buffer updates are applied once, after the forward graph), so the plain checkpoint is used there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def scratch_norm_statistics(module: nn.Module) -> Iterator[None]:
    """While inside, the BatchNorm layers of `module` in training mode update copies of their running statistics
    and `num_batches_tracked`, which are dropped on leaving: the real buffers (the same tensor objects, which
    DDP holds on to) stay unchanged.

    Copies rather than `track_running_stats = False`: without running statistics batch_norm saves fewer tensors
    for its backward, and the checkpoint matches recomputed saved tensors to the original ones by position.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    originals = [{name: getattr(norm, name) for name in _STATISTICS} for norm in norms]
    for norm, buffers in zip(norms, originals, strict=True):
        for name, buffer in buffers.items():
            if buffer is not None:
                setattr(norm, name, buffer.clone())
    try:
        yield
    finally:  # also when the recomputation stops early (checkpoint's early stop raises through here)
        for norm, buffers in zip(norms, originals, strict=True):
            for name, buffer in buffers.items():
                setattr(norm, name, buffer)


def _contexts(module: nn.Module) -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
    """checkpoint's `context_fn`: nothing around the first forward, scratch statistics around the recomputation."""
    return nullcontext(), scratch_norm_statistics(module)


def checkpointed_call(block: nn.Module, x: Tensor) -> Tensor:
    """`block(x)`, keeping only `x` for the backward pass, which recomputes the block without updating its
    BatchNorm statistics again."""
    if torch.compiler.is_compiling():
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(block, x, use_reentrant=False, preserve_rng_state=True, context_fn=partial(_contexts, block))
