"""`PreemptionHandler`: on SIGTERM, Ctrl-C (SIGINT) or SLURM's requeue signal save `last.ckpt` at the next safe
point and exit; in validate, test and predict stop after the current batch without saving."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from resnet_lit.errors import ResNetLitError
from resnet_lit.fault_tolerance.checkpointing import ResumableCheckpoint, checkpoint_metrics, in_gradient_accumulation
from resnet_lit.fault_tolerance.cluster import detect_launch
from resnet_lit.fault_tolerance.distributed import host_barrier, host_group, host_max, host_max_each, is_sync_step

_REQUEUE_RANK = 1000
FIRST_AGREEMENT_STEPS = 10  # before the step time is known: agree after this many steps (or a logging step)
REQUEUE_TIMEOUT_S = 120  # `scontrol requeue` that takes longer is given up (the other ranks wait for it)
_now = time.monotonic  # the clock that times the steps between agreements (tests replace it)


class Preempted(SystemExit):
    """Raised (on every rank together) after the preemption checkpoint is written; exit status 128 + signal."""


class Interrupted(SystemExit):
    """Raised when a signal stops a run without a checkpoint (validate, test, predict, or a second Ctrl-C);
    exit status 128 + signal: 143 for SIGTERM, 130 for SIGINT."""


class PreemptionHandler(Callback):
    """Turns SIGTERM, Ctrl-C (SIGINT) and, under SLURM with auto-requeue, the requeue signal (SIGUSR1) into
    "save and exit" during `fit`, and into "stop after this batch" during validate, test and predict.

    The signal handler only records the signal. A single process acts on it after the current training step
    (after the optimizer step; never in the middle of a gradient accumulation), or at the epoch end if it came
    during the last batch or the epoch-end validation. Several processes first agree on it: an all-reduce of
    host integers over a gloo group, so that a signal seen by any rank counts; it needs no GPU sync, but a
    network round trip through every rank, so it is not done after every step. The ranks agree at every epoch
    end, after every logging step (`trainer.log_every_n_steps`, whose logs sync anyway) and in between at most
    `agree_every_n_steps` steps apart; by default that interval is derived from the step time measured between
    agreements, to agree about every `agree_every_seconds`. A signal thus stops a distributed run within about
    that time plus one step: with one checkpoint write, the grace time a scheduler must give.

    Then all ranks write `last.ckpt` through the checkpoint callback and raise :class:`Preempted`, a
    `SystemExit` with status 128 + signal number (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1). When ranks
    saw different signals, the requeue signal wins, then SIGTERM. For the requeue signal, rank 0 first runs
    `scontrol requeue <job id>`, as Lightning's SLURM support does; the requeued job resumes with
    `--ckpt_path last`. The ranks exit together, after rank 0's requeue: under `srun --kill-on-bad-exit` the
    first task to exit with a failure status ends the others, a running `scontrol requeue` included. A second
    SIGINT stops at once, without saving (:class:`Interrupted`, status 130); a third one kills the process
    (the system's default action).

    In validate, test and predict the ranks agree after each batch that all of them run, stop, say so, save
    nothing and raise :class:`Interrupted`.

    This replaces Lightning's own handlers, which save the SLURM checkpoint inside the signal handler (possibly
    mid-backward), otherwise exit on SIGTERM without saving (status 0 in validate and test, not at all in
    predict), and turn Ctrl-C into a KeyboardInterrupt that saves nothing. The handlers are installed when
    Lightning's are (at the sanity check or `on_train_start`, at the start of evaluation or prediction) and put
    back by Lightning at teardown. A signal that arrives after the last training batch (during the final
    validation) lets the run finish normally.

    Args:
        agree_every_n_steps: the most training steps between two agreements on signals; None: derived from the
            measured step time (about `agree_every_seconds` apart; after the first 10 steps before any was
            measured).
        agree_every_seconds: the time between agreements that the derived interval aims at.
    """

    def __init__(self, agree_every_n_steps: int | None = None, agree_every_seconds: float = 3.0) -> None:
        if agree_every_n_steps is not None and agree_every_n_steps < 1:
            raise ResNetLitError(
                f"PreemptionHandler agree_every_n_steps must be at least 1, got {agree_every_n_steps!r}"
            )
        if not agree_every_seconds > 0:
            raise ResNetLitError(f"PreemptionHandler agree_every_seconds must be positive, got {agree_every_seconds!r}")
        self.agree_every_n_steps = agree_every_n_steps
        self.agree_every_seconds = agree_every_seconds
        self._next_agreement = 0  # the global step after which the ranks agree next (at the latest)
        self._last_agreement = (0, 0.0)  # global step and clock of the previous agreement (or of the start)
        self._signum = 0
        self._interrupts = 0  # SIGINTs received
        self._forwarded = False
        self._launcher: Any = None  # the strategy's launcher, when Lightning started the processes itself
        self._requeue_signum: int | None = None
        self._group: Any = None
        self._speaks = True  # global rank 0: says what a Ctrl-C does
        self._evaluating = False  # validate/test/predict: stop after a batch, save nothing
        self._agreed_batches = 0  # evaluation batches that every rank runs (agreement is collective)
        self._batches_done = 0

    # --- signals -----------------------------------------------------------------------------------------
    def _signals(self, trainer: pl.Trainer) -> list[int]:
        signums = [signal.SIGTERM, signal.SIGINT]
        requeue = self._requeue_signal(trainer)
        if requeue and not self._evaluating:
            signums.append(requeue)
        return signums

    def _requeue_signal(self, trainer: pl.Trainer) -> int | None:
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            return environment.requeue_signal
        return None

    def _rank(self, signum: int) -> int:
        """The value ranks all-reduce (max): the requeue signal outranks SIGTERM, which outranks SIGINT."""
        return _REQUEUE_RANK + signum if signum and signum == self._requeue_signum else signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two Python bytecodes of the main thread: only record, never save here.
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                self._say("resnet-lit: second SIGINT: stopping now, without saving")
                raise Interrupted(128 + signal.SIGINT)
            what = "stopping after this batch" if self._evaluating else "saving a checkpoint at the next step"
            self._say(f"resnet-lit: SIGINT: {what} (press Ctrl-C again to stop at once, without saving)")
        if self._rank(signum) > self._rank(self._signum):
            self._signum = signum
        if signum != signal.SIGINT and self._launcher is not None and not self._forwarded:
            # Processes that Lightning started itself (ddp on one node) get it too; a Ctrl-C reaches them anyway.
            self._forwarded = True
            self._launcher.kill(signum)

    def _say(self, line: str) -> None:
        """Write a line to stderr from the signal handler: unbuffered, as the main thread may be mid-print."""
        if not self._speaks:
            return
        with contextlib.suppress(AttributeError, OSError, ValueError):  # no real stderr (e.g. captured by a test)
            os.write(sys.stderr.fileno(), f"{line}\n".encode())

    def _install(self, trainer: pl.Trainer) -> None:
        """Take over the signals from Lightning's handlers (which Lightning puts back at teardown)."""
        self._launcher = trainer.strategy.launcher
        self._requeue_signum = None if self._evaluating else self._requeue_signal(trainer)
        self._speaks = trainer.is_global_zero
        if trainer.received_sigterm:  # arrived while Lightning's handler was installed
            self._signum = max(self._signum, signal.SIGTERM, key=self._rank)
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("resnet-lit: not in the main thread; preemption signals are left to Lightning")
            return
        for signum in self._signals(trainer):
            if signum != signal.SIGINT or self._interrupts < 2:
                signal.signal(signum, self._handle)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._signum, self._interrupts, self._forwarded = 0, 0, False
        self._evaluating = trainer.state.fn != TrainerFn.FITTING
        self._group = None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer)  # a signal during the sanity check is acted on at the first training step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._group = host_group(trainer)  # CPU all-reduce: agreeing costs no GPU sync
        self._install(trainer)
        self._schedule(trainer, self.agree_every_n_steps or FIRST_AGREEMENT_STEPS)

    # --- safe points ---------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_last_batch or in_gradient_accumulation(trainer, batch_idx):
            return  # act at the epoch end, or after the optimizer step that ends the gradient accumulation
        step = trainer.global_step
        # The same decision on every rank. A single process has no one to agree with: it acts at the next step.
        if self._group is None or step >= self._next_agreement or is_sync_step(trainer, step):
            self._maybe_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_stop(trainer)

    def _schedule(self, trainer: pl.Trainer, steps: int) -> None:
        self._last_agreement = (trainer.global_step, _now())
        self._next_agreement = trainer.global_step + steps

    def _agree(self, trainer: pl.Trainer) -> int:
        """The ranks' strongest signal (see `_rank`), and the next agreement scheduled. Collective.

        The all-reduce carries each rank's time per step since the previous agreement too: the slowest rank's
        sets the interval, the same on every rank.
        """
        last_step, last_time = self._last_agreement
        micros = int((_now() - last_time) * 1e6 / max(1, trainer.global_step - last_step))
        code, micros = host_max_each(trainer, [self._rank(self._signum), micros], self._group)
        steps = self.agree_every_n_steps or max(1, int(self.agree_every_seconds * 1e6 / max(micros, 1)))
        self._schedule(trainer, steps)
        return code

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        code = self._agree(trainer)
        if not code:
            return
        signum = code - _REQUEUE_RANK if code >= _REQUEUE_RANK else code
        name = signal.Signals(signum).name
        rank_zero_info(f"resnet-lit: received {name}; saving a checkpoint at step {trainer.global_step}")
        path = save_last_checkpoint(trainer)
        if signum == self._requeue_signum and trainer.is_global_zero:
            requeue_slurm_job()
        for logger in trainer.loggers:  # written before the ranks leave: an exit may end the others' processes
            logger.save()
        host_barrier(self._group)  # no rank exits before rank 0's requeue is done
        stopped = "interrupted" if signum == signal.SIGINT else "preempted"
        rank_zero_info(
            f"resnet-lit: {stopped} by {name} at epoch {trainer.current_epoch}, step {trainer.global_step}; "
            f"saved {path}. Run the same command with --ckpt_path last to continue."
        )
        raise Preempted(128 + signum)

    # --- validate, test, predict -------------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._evaluating:  # not the validation inside fit
            self._start_evaluation(trainer, trainer.num_val_batches)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, trainer.num_test_batches)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_evaluation(trainer, trainer.num_predict_batches)

    def _start_evaluation(self, trainer: pl.Trainer, batches: list[int | float]) -> None:
        self._group = host_group(trainer)
        self._install(trainer)
        # Ranks may run different numbers of batches: agree only after the batches that all of them run.
        # Each rank sends minus its count, or +1 for an unknown length (which turns agreement off).
        total = sum(batches)
        common = -host_max(trainer, 1 if math.isinf(total) else -int(total), self._group)
        self._agreed_batches, self._batches_done = max(common, 0), 0

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if self._evaluating:
            self._maybe_stop_evaluation(trainer, "validate")

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._maybe_stop_evaluation(trainer, "test")

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._maybe_stop_evaluation(trainer, "predict")

    def _maybe_stop_evaluation(self, trainer: pl.Trainer, command: str) -> None:
        self._batches_done += 1
        signum = self._signum
        if self._batches_done <= self._agreed_batches:
            signum = host_max(trainer, self._rank(signum), self._group)
        if not signum:
            return
        name = signal.Signals(signum).name
        rank_zero_info(f"resnet-lit: {command} stopped by {name} after {self._batches_done} batches; nothing saved")
        raise Interrupted(128 + signum)


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
        result = subprocess.call(["scontrol", "requeue", job_id], timeout=REQUEUE_TIMEOUT_S)
    except FileNotFoundError:
        rank_zero_warn("resnet-lit: scontrol not found; the job was not requeued")
        return 127
    except subprocess.TimeoutExpired:
        rank_zero_warn(f"resnet-lit: `scontrol requeue {job_id}` did not finish within {REQUEUE_TIMEOUT_S} s; "
                       "the job may not be requeued")  # fmt: skip
        return 124
    if result == 0:
        rank_zero_info(f"resnet-lit: requeued SLURM job {job_id}")
    else:
        rank_zero_warn(f"resnet-lit: `scontrol requeue {job_id}` failed with exit status {result}")
    return result
