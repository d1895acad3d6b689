"""`WeightEMA`: an exponential moving average of a network's weights (`model.ema_decay`).

After every optimizer step that was taken, each floating parameter and buffer (BatchNorm statistics) of the
average moves toward the live network's::

    ema = decay_n * ema + (1 - decay_n) * live,    decay_n = min(ema_decay, (1 + n) / (10 + n))

where n is the number of updates made before this one (0 at the first). The warm-up term (TensorFlow's
`ExponentialMovingAverage(num_updates=...)`; timm and torchvision's references warm up alike) keeps a short
run from staying near the initial weights: the first update keeps 10% of the old average, the 90th about 91%,
and `ema_decay` is reached after about 9 / (1 - ema_decay) updates. Integer buffers (BatchNorm's
`num_batches_tracked`) are copied. A step dropped by `model.nonfinite_loss: skip` is no update; a step that
fp16's GradScaler skips is one (toward the unchanged weights): telling would cost a host sync.

The average is a submodule of the LightningModule, so it moves to the device with it and is saved in
checkpoints (the update count as `ema._extra_state`, a CPU tensor, so that the state dict holds only tensors),
and a resume continues it exactly. A checkpoint written without `model.ema_decay` and loaded with it (resume,
validate, predict) starts the average from its network weights; one written with it and loaded with
`model.ema_decay: null` drops its average (:func:`align_ema_state`). Under DDP every rank makes the same
updates, so the averaged weights agree; its BatchNorm statistics differ between ranks as the live network's
do (DDP broadcasts rank 0's buffers, the average's included, before each training forward; checkpoints hold
rank 0's).
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from resnet_lit.errors import ResNetLitError

EMA_PREFIX = "ema."  # the average's keys in a ResNetClassifier state dict: "ema.net.<key>", "ema._extra_state"
NET_PREFIX = "net."


def check_ema_decay(decay: float) -> float:
    """`decay` if it lies in (0, 1), else a one-line :class:`ResNetLitError` naming `model.ema_decay`."""
    if not 0.0 < decay < 1.0:
        raise ResNetLitError(
            f"model.ema_decay must be in (0, 1), e.g. 0.999 (null turns the average off), got {decay!r}"
        )
    return float(decay)


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` + 1: `min(decay, (1 + updates) / (10 + updates))`."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA(nn.Module):
    """A copy of `net` (parameters frozen, same memory format) whose weights follow `net`'s by an exponential
    moving average with warm-up; see the module docstring for the formula.

    The update count is a Python int, so that `update` reads nothing from the device; it is saved in the state
    dict through `get_extra_state`.

    Args:
        net: the live network; copied now, so call this before compiling it.
        decay: the decay in (0, 1) that the warm-up approaches.
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = check_ema_decay(decay)
        self.net = copy.deepcopy(net)
        self.net.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        """Move the average one step toward `net` (a network of the same structure as the copy)."""
        weight = 1.0 - warmed_up_decay(self.decay, self.updates)
        averaged: list[Tensor] = []
        live: list[Tensor] = []
        copied: list[Tensor] = []
        sources: list[Tensor] = []
        for ours, theirs in zip(self.net.parameters(), net.parameters(), strict=True):
            averaged.append(ours)
            live.append(theirs.detach())
        for ours, theirs in zip(self.net.buffers(), net.buffers(), strict=True):
            (averaged if ours.is_floating_point() else copied).append(ours)
            (live if ours.is_floating_point() else sources).append(theirs.detach())
        if averaged:
            torch._foreach_lerp_(averaged, live, weight)
        if copied:
            torch._foreach_copy_(copied, sources)
        self.updates += 1

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self.updates, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        self.updates = int(state)


def align_ema_state(state: MutableMapping[str, Any], ema: WeightEMA | None) -> str | None:
    """Fit the EMA entries of a ResNetClassifier checkpoint's `state` to a model with (`ema`) or without the
    average, in place; returns what was done, or None when nothing was needed.

    A checkpoint written without `model.ema_decay` that is loaded with it starts the average from its network
    weights (count 0, so the warm-up starts again); one written with it and loaded without drops its average.
    """
    has_network = any(key.startswith(NET_PREFIX) for key in state)
    ema_keys = [key for key in state if key.startswith(EMA_PREFIX)]
    if ema is not None and has_network and not ema_keys:
        for key in [key for key in state if key.startswith(NET_PREFIX)]:
            state[f"{EMA_PREFIX}{key}"] = state[key]  # copied into the average by the load
        state[f"{EMA_PREFIX}_extra_state"] = torch.tensor(0, dtype=torch.int64)
        return (
            "resnet-lit: the checkpoint holds no weight average (it was written without model.ema_decay): "
            "the average starts from its network weights"
        )
    if ema is None and ema_keys:
        for key in ema_keys:
            del state[key]
        return "resnet-lit: model.ema_decay is null: the checkpoint's weight average is not loaded"
    return None
