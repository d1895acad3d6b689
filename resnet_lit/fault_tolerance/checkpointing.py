"""`ResumableCheckpoint`: a ModelCheckpoint whose `last.ckpt` is always current, for `--ckpt_path last`."""

from __future__ import annotations

import copy
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from resnet_lit.fault_tolerance.distributed import is_sync_step


def checkpoint_metrics(trainer: pl.Trainer) -> dict[str, Tensor]:
    """What checkpoint file names and the top-k ranking read: the logged metrics, `epoch` and `step`."""
    metrics = copy.deepcopy(dict(trainer.callback_metrics))
    metrics["epoch"] = torch.tensor(trainer.current_epoch)
    metrics["step"] = torch.tensor(trainer.global_step)
    return metrics


class ResumableCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` tuned for resuming: `last.ckpt` is rewritten at every step/time interval and at every
    epoch end, whatever the monitored metric does.

    Differences from Lightning's `ModelCheckpoint` (all arguments are the same):

    * `every_n_train_steps` / `train_time_interval` refresh `last.ckpt` immediately, also before the monitored
      metric exists (Lightning defers such saves to the next validation, i.e. to the end of the first epoch,
      which for ImageNet is hours). Mid-epoch saves write only `last.ckpt`; ranked "best" checkpoints are
      saved when the monitored metric is fresh, after validation. With `monitor: null` the interval saves
      also write the rolling `save_top_k` files, as in Lightning.
    * With an interval set, Lightning stops saving at epoch ends; here `every_n_epochs` still defaults to 1,
      so the best-k files follow every validation and `last.ckpt` is written at every epoch end.
    * `train_time_interval` is checked after logging steps only (every `trainer.log_every_n_steps` steps),
      where ranks sync anyway, not after every step: deciding it takes a collective (rank 0's clock decides).
    * `last.ckpt` is written at every epoch end, not only when a top-k file was written.
    * A run that stops mid-epoch, by `max_steps` or by a callback's `should_stop` after a training step (the Timer
      of `max_time`), writes `last.ckpt` at that step as a mid-epoch state, so that a resume with a larger limit
      finishes the epoch (Lightning's epoch-end save that follows would mark the epoch as done; it is skipped, the
      step being saved).
    * No interval save on the last batch of an epoch (the epoch-end save follows right after it), nor in the
      middle of a gradient accumulation (a checkpoint cannot hold half-accumulated gradients).

    This applies with `save_last: true` (the resnet-lit default) and automatic optimization; otherwise the
    callback behaves exactly like Lightning's. It extends ModelCheckpoint through its protected members (the
    top-k and last-file savers, the save triggers); tests/test_checkpoints.py pins each of them.

    Checkpoints are written atomically by the resnet-lit CLI's `AtomicCheckpointIO` (write, fsync, rename),
    so a crash during a save leaves the previous `last.ckpt` intact.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = None,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            save_on_exception=save_on_exception,
            save_weights_only=save_weights_only,
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        if every_n_epochs is None:
            self._every_n_epochs = 1  # also part of `state_key`, under which checkpoints hold this callback's state
        self._step_interval = every_n_train_steps or 0
        self._time_interval = train_time_interval
        self._interval_clock: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._interval_clock = time.monotonic()

    def _uses_parent_logic(self, pl_module: pl.LightningModule) -> bool:
        # save_last: link makes last.ckpt a link to the newest ranked file, which mid-epoch saves do not write.
        return self.save_last is not True or not pl_module.automatic_optimization

    def _interval_due(self, trainer: pl.Trainer) -> bool:
        due = self._step_interval >= 1 and trainer.global_step % self._step_interval == 0
        # The clock is read at the steps that sync anyway: the decision is a collective.
        if self._time_interval is not None and is_sync_step(trainer, trainer.global_step):
            now = time.monotonic()
            previous = self._interval_clock
            time_due = previous is not None and now - previous >= self._time_interval.total_seconds()
            time_due = trainer.strategy.broadcast(time_due)  # one clock decides, so all ranks save together
            if time_due:
                self._interval_clock = now
            due = due or time_due
        return due

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._uses_parent_logic(pl_module):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        interval_due = self._interval_due(trainer)  # first: on some steps it is a collective
        if not (interval_due or _training_stops_here(trainer)) or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.is_last_batch:
            return  # the epoch-end save (after validation) comes next
        if in_gradient_accumulation(trainer, batch_idx):
            return  # the accumulated gradients are not in a checkpoint
        metrics = checkpoint_metrics(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, metrics)
        self._save_last(trainer, metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._uses_parent_logic(pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            return
        if self._should_skip_saving_checkpoint(trainer):
            return  # saved at this step already (e.g. after this epoch's validation)
        self._save_epoch_end(trainer, top_k=self._should_save_on_train_epoch_end(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._uses_parent_logic(pl_module):
            super().on_validation_end(trainer, pl_module)
            return
        if self._should_skip_saving_checkpoint(trainer) or self._should_save_on_train_epoch_end(trainer):
            return
        self._save_epoch_end(trainer, top_k=True)

    def _save_epoch_end(self, trainer: pl.Trainer, top_k: bool) -> None:
        metrics = checkpoint_metrics(trainer)
        if top_k and self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, metrics)
        self._save_last(trainer, metrics)

    def _save_last(self, trainer: pl.Trainer, metrics: dict[str, Tensor]) -> None:
        # ModelCheckpoint's own last-file logic: version counter, `save_last: link`, removal of the previous file.
        self._save_last_checkpoint(trainer, metrics)

    def save_last_now(self, trainer: pl.Trainer) -> str:
        """Write `last.ckpt` for the current step unless that was done already; return its path.

        Call it on all ranks (saving is collective), at a point where the loops' state is consistent
        (`on_train_batch_end`, `on_train_epoch_end`), e.g. on preemption.
        """
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last(trainer, checkpoint_metrics(trainer))
        return self.last_model_path


def in_gradient_accumulation(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer has not stepped after batch `batch_idx` (of the epoch) because gradients of the
    next batches are still to be added. The last batch of an epoch always ends an accumulation."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches != 0 and not trainer.is_last_batch


def _training_stops_here(trainer: pl.Trainer) -> bool:
    """Whether training ends after this step: `trainer.max_steps` is reached, or a callback set `should_stop` (the
    Timer of `trainer.max_time`, for one) and Lightning will honour it (`min_epochs` and `min_steps` are met, the
    test of `fit_loop._can_stop_early`). Saved here, `last.ckpt` is a mid-epoch state; the epoch-end save that
    Lightning runs next would record the epoch as finished, so that a resume would skip the rest of the epoch."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    if not trainer.should_stop:
        return False
    fit_loop = trainer.fit_loop
    met_min_epochs = not fit_loop.min_epochs or fit_loop.epoch_progress.current.processed >= fit_loop.min_epochs
    met_min_steps = not fit_loop.min_steps or trainer.global_step >= fit_loop.min_steps
    return met_min_epochs and met_min_steps
