"""`ThrottledProgressBar`: Lightning's TQDM progress bar, redrawn at most a few times per second."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class ThrottledProgressBar(TQDMProgressBar):
    """Lightning's `TQDMProgressBar`, redrawn (with its metrics) at most every `min_interval` seconds, and after
    the last batch of each loop.

    Lightning's bar redraws every `refresh_rate` batches whatever their pace: at hundreds of steps per second,
    hundreds of terminal writes and metric conversions per second on the training thread. The resnet-lit CLI
    uses this bar unless the config brings a progress bar of its own (in `trainer.callbacks`) or sets
    `trainer.enable_progress_bar: false`.

    Args:
        refresh_rate: as in `TQDMProgressBar`: redraw at most every this many batches.
        process_position: as in `TQDMProgressBar`.
        leave: as in `TQDMProgressBar`.
        min_interval: the least time in seconds between two redraws of a bar.
    """

    def __init__(
        self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False, min_interval: float = 0.25
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.min_interval = min_interval
        self._drawn: dict[str, float] = {}  # loop -> clock of its bar's last redraw

    def _due(self, loop: str, bar: Any, batch_idx: int) -> bool:
        now = time.monotonic()
        if batch_idx + 1 != bar.total and now - self._drawn.get(loop, -float("inf")) < self.min_interval:
            return False
        self._drawn[loop] = now
        return True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due("train", self.train_progress_bar, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due("validation", self.val_progress_bar, batch_idx):
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due("test", self.test_progress_bar, batch_idx):
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._due("predict", self.predict_progress_bar, batch_idx):
            super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
