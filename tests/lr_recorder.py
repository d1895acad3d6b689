"""`recorded_lrs`: run `resnet-lit fit` in-process and return the learning rate of every group at every step."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from resnet_lit.training_cli import ResNetLitCLI


class LRRecorder(Callback):
    """The learning rate of every group at every optimizer step, by global step."""

    def __init__(self) -> None:
        self.lrs: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self.lrs[trainer.global_step] = [group["lr"] for group in optimizer.param_groups]


def recorded_lrs(args: list[str]) -> dict[int, list[float]]:
    """Run the fit that `args` describe, with an `LRRecorder` added to its callbacks, and return what it recorded."""
    cli = ResNetLitCLI(args=[*args, "--trainer.callbacks+=lr_recorder.LRRecorder"])
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, LRRecorder)).lrs
