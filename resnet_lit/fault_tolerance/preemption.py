"""`PreemptionHandler`: on SIGTERM (or SLURM's requeue signal) save `last.ckpt` at the next safe point and exit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from resnet_lit.fault_tolerance.checkpointing import ResumableCheckpoint, checkpoint_metrics, in_gradient_accumulation
from resnet_lit.fault_tolerance.cluster import detect_launch
from resnet_lit.fault_tolerance.distributed import host_group, host_max

_REQUEUE_RANK = 1000


class Preempted(SystemExit):
    """Raised (on every rank together) after the preemption checkpoint is written; exit status 128 + signal."""


class PreemptionHandler(Callback):
    """Turns SIGTERM, and under SLURM with auto-requeue the requeue signal (SIGUSR1), into "save and exit".

    The signal handler only records the signal. At the end of the current training batch (the next
    `on_train_batch_end`, after the optimizer step), or at the epoch end if the signal came during the last
    batch or epoch-end validation, all ranks agree on it (an all-reduce of a host integer over a gloo group,
    so a signal seen by any rank counts and no GPU sync is needed), write `last.ckpt` through the checkpoint
    callback, and raise :class:`Preempted`, a `SystemExit` with status 128 + signal number (143 for SIGTERM,
    138 for SIGUSR1). For the requeue signal, rank 0 first runs `scontrol requeue <job id>`, as Lightning's
    SLURM support does; the requeued job resumes with `--ckpt_path last`.

    This replaces Lightning's own handlers during training, which save the SLURM checkpoint inside the
    signal handler (possibly mid-backward) and otherwise exit on SIGTERM without saving. The handlers are
    installed at `on_train_start` and put back by Lightning at teardown. A signal that arrives after the
    last training batch (during the final validation) lets the run finish normally.
    """

    def __init__(self) -> None:
        self._signum = 0
        self._forwarded = False
        self._launcher: Any = None  # the strategy's launcher, when Lightning started the processes itself
        self._requeue_signum: int | None = None
        self._group: Any = None

    # --- signals -----------------------------------------------------------------------------------------
    def _signals(self, trainer: pl.Trainer) -> list[int]:
        signums = [signal.SIGTERM]
        requeue = self._requeue_signal(trainer)
        if requeue:
            signums.append(requeue)
        return signums

    def _requeue_signal(self, trainer: pl.Trainer) -> int | None:
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return environment.requeue_signal
        return None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two Python bytecodes of the main thread: only record, never save here.
        if not self._signum or signum == self._requeue_signum:
            self._signum = signum
        if self._launcher is not None and not self._forwarded:
            self._forwarded = True
            self._launcher.kill(signum)  # processes that Lightning started itself (ddp on one node) get it too

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._launcher = trainer.strategy.launcher
        self._requeue_signum = self._requeue_signal(trainer)
        self._group = host_group(trainer)  # CPU all-reduce: agreeing every step costs no GPU sync
        self._signum, self._forwarded = 0, False
        if trainer.received_sigterm:  # arrived while Lightning's handler was installed (before training)
            self._signum = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("resnet-lit: not in the main thread; preemption signals are left to Lightning")
            return
        for signum in self._signals(trainer):
            signal.signal(signum, self._handle)

    # --- safe points ---------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_last_batch or in_gradient_accumulation(trainer, batch_idx):
            return  # act at the epoch end, or after the optimizer step that ends the gradient accumulation
        self._maybe_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_stop(trainer)

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        # The requeue signal outranks SIGTERM when ranks saw different signals.
        requeue = self._requeue_signum
        code = host_max(trainer, _REQUEUE_RANK + self._signum if self._signum == requeue else self._signum, self._group)
        if not code:
            return
        signum = code - _REQUEUE_RANK if code >= _REQUEUE_RANK else code
        name = signal.Signals(signum).name
        rank_zero_info(f"resnet-lit: received {name}; saving a checkpoint at step {trainer.global_step}")
        path = save_last_checkpoint(trainer)
        if signum == requeue and trainer.is_global_zero:
            requeue_slurm_job()
        rank_zero_info(
            f"resnet-lit: preempted by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"saved {path}. Run the same command with --ckpt_path last to continue."
        )
        raise Preempted(128 + signum)


def cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The Trainer's cluster environment. A single-device strategy has none; in a SLURM job (one task) it is
    Lightning's default `SLURMEnvironment` there, as in Lightning's own signal handling. (A ClusterEnvironment
    plugin given to a single-device Trainer is not publicly reachable, so its requeue settings are not seen.)"""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None and detect_launch().launcher == "slurm":
        environment = SLURMEnvironment()
    return environment


def save_last_checkpoint(trainer: pl.Trainer) -> str:
    """Write `last.ckpt` for the current step through the run's checkpoint callback; collective."""
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.save_last]
    for callback in callbacks:
        if isinstance(callback, ResumableCheckpoint):
            return callback.save_last_now(trainer)
    if callbacks:
        callback = callbacks[0]
        path = callback.format_checkpoint_name(checkpoint_metrics(trainer), callback.CHECKPOINT_NAME_LAST)
        callback.last_model_path = path  # part of the callback state that the checkpoint holds
        trainer.save_checkpoint(path, callback.save_weights_only)
        return path
    folder = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
    path = os.path.join(folder or os.path.join(trainer.default_root_dir, "checkpoints"), "last.ckpt")
    trainer.save_checkpoint(path)
    return path


def requeue_slurm_job() -> int:
    """`scontrol requeue` this SLURM job (array task aware); returns scontrol's exit status."""
    array_job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job_id is not None:
        job_id = f"{array_job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job_id = os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job_id):
        raise ValueError(f"unexpected SLURM job id {job_id!r}")
    try:
        result = subprocess.call(["scontrol", "requeue", job_id])
    except FileNotFoundError:
        rank_zero_warn("resnet-lit: scontrol not found; the job was not requeued")
        return 127
    if result == 0:
        rank_zero_info(f"resnet-lit: requeued SLURM job {job_id}")
    else:
        rank_zero_warn(f"resnet-lit: `scontrol requeue {job_id}` failed with exit status {result}")
    return result
