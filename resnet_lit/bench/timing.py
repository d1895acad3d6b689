"""Clocks of the benchmarks: device syncs, peak memory, and the callbacks that time `fit` from inside the Trainer
(`StepTimer` for steady-state steps, `TimeToAccuracy` for the wall time to a validation target, `PhaseClock` for
where a whole run's wall time goes)."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Protocol

import lightning as L
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock reads the time of finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak CUDA memory allocated, or peak RSS of this process sampled every 10 ms on CPUs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.peak_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def stop(self) -> float | None:
        """Stop sampling; the peak in MiB (None where it cannot be read)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())
        return self.peak_bytes / 2**20 if self.peak_bytes else None


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Stepper(Protocol):
    """Anything that runs one training step per call, e.g. the hand-written loop."""

    def step(self) -> None: ...


class StepTimer(L.Callback):
    """Times ``steps`` training steps after ``warmup`` steps, leaving out steps that span an epoch boundary.

    The clock (after a device sync) starts at the end of step ``warmup``; at the end of an epoch's last batch
    it stops, and restarts at the end of the next epoch's first batch (so validation, checkpointing and
    iterator start-up between epochs are not counted). After ``steps`` timed steps it stops the trainer.
    """

    def __init__(self, warmup: int = 10, steps: int = 20) -> None:
        self.warmup = warmup
        self.steps = steps
        self.seconds = 0.0
        self.timed_steps = 0
        self.step_seconds: list[float] = []  # each timed step alone, on CPUs (no device sync needed)
        self.companion: Stepper | None = None  # a hand-written loop taking turns with fit's steps (CPU)
        self.companion_seconds: list[float] = []
        self.peak_memory_mb: float | None = None
        self._seen = 0
        self._last = 0.0
        self._start: float | None = None
        self._memory: PeakMemory | None = None

    @property
    def done(self) -> bool:
        return self.timed_steps >= self.steps

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        counted_before = self.timed_steps
        self._timed_batch_end(trainer, pl_module, batch_idx)
        if self.companion is not None and not (self.done and self.timed_steps == counted_before):
            begin = time.perf_counter()
            self.companion.step()
            end = time.perf_counter()
            if self.timed_steps > counted_before:
                self.companion_seconds.append(end - begin)
            if self._start is not None:  # the fit's clock does not count the loop's step
                self._start += end - begin
                self._last = end

    def _timed_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> None:
        self._seen += 1
        if self.done or self._seen < self.warmup:
            return
        device = pl_module.device
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if self._start is None:  # end of the warm-up, or first batch of an epoch: (re)start the clock
            if last_of_epoch:  # the next step would span the epoch boundary
                return
            sync(device)
            if self._memory is None:
                self._memory = PeakMemory(device)
                self._memory.start()
            self._start = self._last = time.perf_counter()
            return
        self.timed_steps += 1
        if device.type == "cpu":
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self._last = now
        if self.done or last_of_epoch:
            sync(device)
            self.seconds += time.perf_counter() - self._start
            self._start = None
        if self.done:
            assert self._memory is not None
            self.peak_memory_mb = self._memory.stop()
            trainer.should_stop = True


class TimeToAccuracy(L.Callback):
    """Records wall time at every validation and stops training once ``monitor`` reaches ``target``.

    Writes ``output`` (JSON, replaced atomically) after every validation, so a run that is killed keeps what
    it measured: the seconds since training started (``on_train_start``, i.e. after data loading and setup),
    the epoch, the metric, and the first time the target was reached.

    ``max_seconds``, the time cap of the run, is checked against the schedule: a learning-rate schedule that
    is cut off by the cap (a cosine still at a high rate) says nothing about the recipe's time to accuracy. From
    the second validation on (the first epoch includes autotuning and other one-off work), the pace since the
    previous validation projects the end of the run's schedule (``trainer.estimated_stepping_batches``); when
    that lies beyond ``max_seconds``, the run stops there and the JSON says so (``schedule_fits: false``).
    """

    def __init__(
        self,
        target: float = 0.94,
        monitor: str = "val/acc",
        output: str = "time_to_accuracy.json",
        stop: bool = True,
        max_seconds: float | None = None,
    ) -> None:
        self.target = target
        self.monitor = monitor
        self.output = output
        self.stop = stop
        self.max_seconds = max_seconds
        self.history: list[dict[str, float]] = []
        self.reached_s: float | None = None
        self.projected_s: float | None = None
        self.stopped: str | None = None
        self._t0: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._t0 is None or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        elapsed = time.perf_counter() - self._t0
        value = float(value)
        self.history.append(
            {"epoch": trainer.current_epoch, "step": trainer.global_step, "seconds": elapsed, self.monitor: value}
        )
        if self.reached_s is None and value >= self.target:
            self.reached_s = elapsed
            if self.stop:
                trainer.should_stop = True
        elif self.reached_s is None:
            self._check_schedule(trainer)
        if trainer.is_global_zero:
            self._write()

    def _check_schedule(self, trainer: L.Trainer) -> None:
        """Stop when the rest of the schedule, at the pace since the previous validation, would end after
        ``max_seconds`` (the pace includes validation; the schedule is the run's optimizer steps)."""
        total = trainer.estimated_stepping_batches
        if self.max_seconds is None or len(self.history) < 2 or not math.isfinite(total):
            return
        last, previous = self.history[-1], self.history[-2]
        if last["step"] <= previous["step"]:
            return
        per_step = (last["seconds"] - previous["seconds"]) / (last["step"] - previous["step"])
        self.projected_s = last["seconds"] + per_step * max(0.0, total - last["step"])
        if trainer.strategy.broadcast(self.projected_s > self.max_seconds):  # rank 0's clock decides for all
            self.stopped = (
                f"the schedule of {int(total)} steps would end after about {self.projected_s:.0f} s of training "
                f"({per_step * 1000:.1f} ms per step), beyond the time cap of {self.max_seconds:.0f} s: "
                "shorten the schedule (fewer epochs) or raise the cap"
            )
            trainer.should_stop = True

    def _write(self) -> None:
        result = {
            "target": self.target,
            "monitor": self.monitor,
            "reached_seconds": self.reached_s,
            "best": max(h[self.monitor] for h in self.history),
            "max_seconds": self.max_seconds,
            "projected_seconds": self.projected_s,
            "schedule_fits": None if self.projected_s is None else self.stopped is None,
            "stopped": self.stopped,
            "history": self.history,
        }
        write_json_atomically(self.output, result)


class PhaseClock(L.Callback):
    """Wall-clock marks (`time.time()`, comparable across processes) of a `fit` run's phases, written as JSON to
    ``output`` when the fit ends: set-up done (``train_start``), first training step, end of training, every
    validation's start and end (the sanity check included), and the final ``val/acc``.

    ``marks`` are earlier marks of the same process to write along (the quickstart benchmark passes the process
    start and the end of its imports). The device is synced at phase boundaries only, never per step.
    """

    def __init__(self, output: str, marks: dict[str, float] | None = None) -> None:
        self.output = output
        self.marks: dict[str, float] = dict(marks or {})
        self.validations: list[tuple[float, float]] = []
        self._validation_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.marks["train_start"] = time.time()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.marks.setdefault("first_step", time.time())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.marks["train_end"] = time.time()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self._validation_start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        if self._validation_start is not None:
            self.validations.append((self._validation_start, time.time()))
            self._validation_start = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        val_acc = trainer.callback_metrics.get("val/acc")
        result = {
            "marks": self.marks,
            "validations": self.validations,
            "val_acc": None if val_acc is None else float(val_acc),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
        }
        write_json_atomically(self.output, result)


def write_json_atomically(path: str, data: Any) -> None:
    """``data`` as indented JSON at ``path``, through a temporary file, so a reader never sees half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(temporary, path)
