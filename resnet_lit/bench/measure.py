"""Benchmarks: training images/s and peak memory of `resnet-lit fit` beside a hand-written PyTorch loop.

    resnet-lit benchmark --model resnet20 --image-size 32 --batch-size 128 --runners loop,fit
    python -m resnet_lit.bench --model resnet50 --image-size 64 --batch-size 32 --precision 32-true,bf16-mixed \
        --memory-format contiguous,channels_last --runners loop --json r50.json
    python -m resnet_lit.bench --data .data/cifar10 --runners pipeline --num-workers 1,2

Runners:

* ``loop``: a minimal hand-written loop: the zoo network, SGD(lr 0.1, momentum 0.9, weight decay 1e-4) (the
  module's default optimizer), cross-entropy, autocast for the mixed precisions. With synthetic data it cycles
  a few pre-built batches already on the device (the least work possible); with real data it iterates the
  same DataModule loader as ``fit``.
* ``fit``: ``resnet-lit fit`` itself (:class:`~resnet_lit.cli.ResNetLitCLI` with its defaults: progress bar,
  CSV logger, checkpointing, metrics), timed by a callback between steps. Synthetic data comes from
  :class:`~resnet_lit.data.SyntheticDataModule` (``--loader device`` by default: already in memory on the
  device), real data from :class:`~resnet_lit.data.ImageFolderDataModule`.
* ``pipeline``: only the input pipeline (decode + augment + collate with ``--num-workers``), no model.

Every list-valued option (comma separated) multiplies the configurations. Each repeat runs every
configuration and runner once (A B A B ...); on CPUs the runs also take turns step by step (``--no-interleave``
turns that off): the loop runs one step after each step of ``fit``, timed apart, and loop-only comparisons of
several configurations alternate their steps. So neighbours' load on a shared machine hits all of them alike.
The table shows medians over the repeats, from the total time of the timed steps and ("quiet", CPUs) from the
faster half of the steps; ratios are medians of the per-repeat ratios. Only steady state is timed:
``--warmup`` steps first (compilation, allocator warm-up), and steps that span an epoch boundary are left out.
Peak memory is ``torch.cuda.max_memory_allocated`` on GPUs and the sampled peak RSS of the process on CPUs
(which holds every model of an interleaved run).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

RUNNERS = ("loop", "fit", "pipeline")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
MEMORY_FORMATS = ("channels_last", "contiguous")


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration (everything but the runner)."""

    model: str = "resnet20"
    image_size: int = 32
    batch_size: int = 128
    precision: str = "32-true"
    memory_format: str = "channels_last"
    compile: bool = False
    data: str = "synthetic"
    loader: str = "device"
    num_workers: int = 0
    num_classes: int = 10
    device: str = "cpu"
    cudnn_benchmark: bool = True

    def label(self) -> str:
        return (
            f"{self.model} {self.image_size}px b{self.batch_size} {self.precision} {self.memory_format}"
            f"{' compiled' if self.compile else ''} {self.data_label()}"
        )

    def data_label(self) -> str:
        data = "synthetic" if self.data == "synthetic" else os.path.basename(os.path.normpath(self.data))
        return f"{data}/{self.loader}" + (f"/w{self.num_workers}" if self.loader == "dataloader" else "")


@dataclass
class RunResult:
    """What a runner returns: total time of the timed steps, their count, peak memory and (CPU) per-step times."""

    seconds: float
    steps: int
    peak_memory_mb: float | None
    step_seconds: list[float] = field(default_factory=list)


@dataclass
class Measurement:
    runner: str
    config: BenchConfig
    images_per_s: float
    steps: int
    seconds: float
    peak_memory_mb: float | None
    repeat: int
    quiet_images_per_s: float | None = None  # from the faster half of the steps (CPU), see `quiet_rate`


@dataclass
class Summary:
    runner: str
    config: BenchConfig
    images_per_s: float
    samples: list[float]
    peak_memory_mb: float | None
    ratio_to_loop: float | None = None
    ratio_to_baseline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- timing helpers -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PeakMemory:
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
        self.companion: LoopStepper | None = None  # a hand-written loop taking turns with fit's steps (CPU)
        self.companion_seconds: list[float] = []
        self.peak_memory_mb: float | None = None
        self._seen = 0
        self._last = 0.0
        self._start: float | None = None
        self._memory: _PeakMemory | None = None

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
            _sync(device)
            if self._memory is None:
                self._memory = _PeakMemory(device)
                self._memory.start()
            self._start = self._last = time.perf_counter()
            return
        self.timed_steps += 1
        if device.type == "cpu":
            now = time.perf_counter()
            self.step_seconds.append(now - self._last)
            self._last = now
        if self.done or last_of_epoch:
            _sync(device)
            self.seconds += time.perf_counter() - self._start
            self._start = None
        if self.done:
            assert self._memory is not None
            self.peak_memory_mb = self._memory.stop()
            trainer.should_stop = True


class TimeToAccuracy(L.Callback):
    """Records wall time at every validation and stops training once ``monitor`` reaches ``target``.

    Writes ``output`` (JSON) after every validation: the seconds since training started (``on_train_start``,
    i.e. after data loading and setup), the epoch, the metric, and the first time the target was reached.
    """

    def __init__(
        self, target: float = 0.94, monitor: str = "val/acc", output: str = "time_to_accuracy.json", stop: bool = True
    ) -> None:
        self.target = target
        self.monitor = monitor
        self.output = output
        self.stop = stop
        self.history: list[dict[str, float]] = []
        self.reached_s: float | None = None
        self._t0: float | None = None
        self._process_t0 = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
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
        if trainer.is_global_zero:
            with open(self.output, "w") as f:
                json.dump(
                    {
                        "target": self.target,
                        "monitor": self.monitor,
                        "reached_seconds": self.reached_s,
                        "best": max(h[self.monitor] for h in self.history),
                        "history": self.history,
                    },
                    f,
                    indent=2,
                )


# --- runners ------------------------------------------------------------------------------------------------
def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _memory_format(name: str) -> torch.memory_format:
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def _synthetic_batches(cfg: BenchConfig, device: torch.device, count: int = 4) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=generator)
        targets = torch.randint(cfg.num_classes, (cfg.batch_size,), generator=generator)
        batches.append((images.to(device), targets.to(device)))
    return batches


def _datamodule(cfg: BenchConfig, num_batches: int) -> Any:
    """The DataModule of ``fit`` and of the loop/pipeline runners on real data."""
    from resnet_lit.data import ImageFolderDataModule, SyntheticDataModule

    if cfg.data == "synthetic":
        return SyntheticDataModule(
            num_classes=cfg.num_classes,
            image_size=cfg.image_size,
            num_samples=cfg.batch_size * num_batches,
            num_val_samples=cfg.batch_size,
            num_test_samples=0,
            batch_size=cfg.batch_size,
            loader=cfg.loader,
            num_workers=cfg.num_workers,
            persistent_workers=True,
        )
    return ImageFolderDataModule(**_folder_args(cfg))


def _folder_args(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "root": cfg.data,
        "transform_style": "cifar" if cfg.image_size <= 64 else "imagenet",
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "persistent_workers": cfg.num_workers > 0,
        "loader": cfg.loader,
        "val_fraction": 0.02,
    }


def _endless(dm: Any, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of a DataModule's train loader on ``device``, epoch after epoch (as Lightning would feed them)."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    loader = dm.train_dataloader()
    for epoch in itertools.count():
        dm.train_sampler.set_epoch(epoch)
        for batch in loader:
            yield dm.on_after_batch_transfer(move_data_to_device(batch, device), 0)


class LoopStepper:
    """The hand-written training loop, one ``step()`` at a time: the zoo network, SGD, cross-entropy, autocast."""

    def __init__(self, cfg: BenchConfig) -> None:
        from resnet_lit.models import create_model

        self.device = torch.device(cfg.device)
        self.cfg = cfg
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.manual_seed(0)
        self.memory_format = _memory_format(cfg.memory_format)
        self.model = create_model(cfg.model, num_classes=cfg.num_classes).to(
            self.device, memory_format=self.memory_format
        )
        if cfg.compile:
            self.model.compile()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "16-mixed")
        self.batches: Iterator[tuple[Tensor, Tensor]]
        if cfg.data == "synthetic":
            self.batches = itertools.cycle(_synthetic_batches(cfg, self.device))
        else:
            self.batches = _endless(_datamodule(cfg, 0), self.device)
        self.model.train()

    def step(self) -> None:
        images, targets = next(self.batches)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with _autocast(self.cfg.precision, self.device):
            loss = F.cross_entropy(self.model(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()  # shuts DataLoader workers down


def run_loop(cfg: BenchConfig, warmup: int, steps: int) -> RunResult:
    """The hand-written training loop."""
    return run_loops_interleaved([cfg], warmup, steps)[0]


def run_loops_interleaved(configs: Sequence[BenchConfig], warmup: int, steps: int) -> list[RunResult]:
    """Hand-written loops of several configurations, taking turns step by step (one configuration: a plain loop).

    Turn-taking puts every configuration through the same moments of a shared machine's load, so their ratios
    hold even when the absolute speed does not. Per-step times need no device sync on CPUs only; on GPUs only
    the total time of each configuration is measured, and the configurations run one after the other.
    """
    devices = {torch.device(cfg.device).type for cfg in configs}
    if len(configs) > 1 and devices != {"cpu"}:
        return [r for cfg in configs for r in run_loops_interleaved([cfg], warmup, steps)]
    steppers = [LoopStepper(cfg) for cfg in configs]
    device = steppers[0].device
    try:
        for _ in range(warmup):
            for stepper in steppers:
                stepper.step()
        _sync(device)
        memory = _PeakMemory(device)
        memory.start()
        if device.type != "cpu":  # one configuration: the total time, no sync per step
            start = time.perf_counter()
            for _ in range(steps):
                steppers[0].step()
            _sync(device)
            return [RunResult(time.perf_counter() - start, steps, memory.stop())]
        step_seconds: list[list[float]] = [[] for _ in steppers]
        for _ in range(steps):
            for stepper, times in zip(steppers, step_seconds, strict=True):
                begin = time.perf_counter()
                stepper.step()
                times.append(time.perf_counter() - begin)
        peak = memory.stop()
        return [RunResult(sum(times), steps, peak, times) for times in step_seconds]
    finally:
        for stepper in steppers:
            stepper.close()


def run_fit(cfg: BenchConfig, warmup: int, steps: int) -> RunResult:
    """`resnet-lit fit` with its defaults, timed by :class:`StepTimer`."""
    return run_fit_and_loop(cfg, warmup, steps, with_loop=False)[0]


def run_fit_and_loop(cfg: BenchConfig, warmup: int, steps: int, with_loop: bool = True) -> list[RunResult]:
    """`resnet-lit fit`, and (``with_loop``, CPU) a hand-written loop step after each of its steps.

    The loop's step runs inside :class:`StepTimer`'s batch-end hook and is timed apart from the fit's step, so
    both see the same moments of a shared machine's load.
    """
    from resnet_lit.cli import ResNetLitCLI

    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    with tempfile.TemporaryDirectory(prefix="resnet-lit-bench-") as root:
        if cfg.data == "synthetic":
            # Enough batches that the timed steps fit in one epoch where memory allows; otherwise StepTimer
            # skips the steps that span epoch boundaries.
            per_image = 3 * cfg.image_size**2 * 4
            num_batches = max(2, min(warmup + steps + 1, (2 << 30) // (per_image * cfg.batch_size)))
            data = {
                "class_path": "resnet_lit.data.SyntheticDataModule",
                "init_args": {
                    "num_classes": cfg.num_classes,
                    "image_size": cfg.image_size,
                    "num_samples": cfg.batch_size * num_batches,
                    "num_val_samples": cfg.batch_size,
                    "num_test_samples": 0,
                    "batch_size": cfg.batch_size,
                    "loader": cfg.loader,
                    "num_workers": cfg.num_workers,
                    "persistent_workers": cfg.num_workers > 0,
                },
            }
        else:
            data = {"class_path": "resnet_lit.data.ImageFolderDataModule", "init_args": _folder_args(cfg)}
        config = {
            "seed_everything": 0,
            "trainer": {
                "accelerator": "gpu" if cfg.device.startswith("cuda") else "cpu",
                "devices": 1,
                "precision": cfg.precision,
                "max_epochs": -1,
                "max_steps": 10**9,  # StepTimer stops the run
                "default_root_dir": root,
                "benchmark": cfg.cudnn_benchmark if cfg.device.startswith("cuda") else None,
                "callbacks": [
                    {"class_path": "resnet_lit.bench.StepTimer", "init_args": {"warmup": warmup, "steps": steps}}
                ],
            },
            "model": {"arch": cfg.model, "channels_last": cfg.memory_format == "channels_last", "compile": cfg.compile},
            "data": data,
        }
        path = os.path.join(root, "bench.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = ResNetLitCLI(args=["--config", path], run=False)
        timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepTimer))
        if with_loop:
            timer.companion = LoopStepper(cfg)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            if timer.companion is not None:
                timer.companion.close()
        if not timer.done:
            raise RuntimeError(f"fit stopped after {timer.timed_steps} of {steps} timed steps")
        results = [RunResult(timer.seconds, timer.timed_steps, timer.peak_memory_mb, timer.step_seconds)]
        if with_loop:
            loop_times = timer.companion_seconds
            results.append(RunResult(sum(loop_times), len(loop_times), timer.peak_memory_mb, loop_times))
        return results


def run_pipeline(cfg: BenchConfig, warmup: int, steps: int) -> RunResult:
    """Only the input pipeline: train batches of the DataModule, moved to the device, no model."""
    device = torch.device(cfg.device)
    dm = _datamodule(cfg, warmup + steps + 1)
    batches = _endless(dm, device)
    memory = _PeakMemory(device)
    start = last = 0.0
    step_seconds = []
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            memory.start()
            start = last = time.perf_counter()
        next(batches)
        if step >= warmup and device.type == "cpu":
            now = time.perf_counter()
            step_seconds.append(now - last)
            last = now
    _sync(device)
    seconds = time.perf_counter() - start
    batches.close()
    return RunResult(seconds, steps, memory.stop(), step_seconds)


_RUN = {"loop": run_loop, "fit": run_fit, "pipeline": run_pipeline}


# --- orchestration ------------------------------------------------------------------------------------------
def measure(
    configs: Sequence[BenchConfig],
    runners: Sequence[str],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    interleave: bool = True,
    log: Any = print,
) -> list[Measurement]:
    """Run every (config, runner) ``repeats`` times: repeat 1 of all, then repeat 2 of all, ...

    With ``interleave`` (CPU only) the runs also take turns step by step: the hand-written loop runs one step
    after each step of ``fit`` (in the same process, timed apart), and loop-only comparisons of several
    configurations alternate their steps. Both then see the same moments of a shared machine's load.
    """
    measurements = []

    def record(runner: str, cfg: BenchConfig, run: RunResult, repeat: int) -> None:
        rate = run.steps * cfg.batch_size / run.seconds
        # With DataLoader workers a step only picks up a prefetched batch: single steps say nothing there.
        prefetched = runner == "pipeline" and cfg.loader == "dataloader" and cfg.num_workers > 0
        quiet = None if prefetched else quiet_rate(run.step_seconds, cfg.batch_size)
        measurements.append(Measurement(runner, cfg, rate, run.steps, run.seconds, run.peak_memory_mb, repeat, quiet))
        log(
            f"[{repeat + 1}/{repeats}] {runner:<8} {cfg.label()}: {rate:,.1f} images/s"
            + (f" (faster half of the steps: {quiet:,.1f})" if quiet else "")
        )

    interleave = interleave and all(torch.device(cfg.device).type == "cpu" for cfg in configs)
    for repeat in range(repeats):
        if not interleave:
            for cfg in configs:
                for runner in runners:
                    record(runner, cfg, _RUN[runner](cfg, warmup, steps), repeat)
            continue
        if "fit" in runners:
            for cfg in configs:
                runs = run_fit_and_loop(cfg, warmup, steps, with_loop="loop" in runners)
                for runner, run in zip(("fit", "loop"), runs, strict=False):
                    record(runner, cfg, run, repeat)
        elif "loop" in runners:
            for cfg, run in zip(configs, run_loops_interleaved(configs, warmup, steps), strict=True):
                record("loop", cfg, run, repeat)
        if "pipeline" in runners:
            for cfg in configs:
                record("pipeline", cfg, run_pipeline(cfg, warmup, steps), repeat)
    return measurements


def quiet_rate(step_seconds: Sequence[float], batch_size: int) -> float | None:
    """Images/s over the faster half of the steps: what the run does while no neighbour takes its CPUs.

    A busy neighbour on a shared CPU machine slows some steps several-fold (a descheduled thread stalls the
    others at every parallel barrier); the faster half of the steps is the run's own speed. None without
    per-step times (GPUs, where timing single steps would need a sync per step).
    """
    if len(step_seconds) < 2:
        return None
    faster = sorted(step_seconds)[: max(1, len(step_seconds) // 2)]
    return batch_size * len(faster) / sum(faster)


def summarize(measurements: Sequence[Measurement]) -> list[Summary]:
    """Medians per (runner, config); `fit` vs `loop` and every config vs the first, as medians of paired ratios.

    Every figure exists twice: from the total time of the timed steps, and (CPU) from the faster half of the
    steps (:func:`quiet_rate`), which is robust to neighbours' load on a shared machine.
    """
    groups: dict[tuple[str, BenchConfig], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.runner, m.config), []).append(m)
    first_config = measurements[0].config if measurements else None
    summaries = []
    for (runner, cfg), items in groups.items():
        rates = [m.images_per_s for m in items]
        peaks = [m.peak_memory_mb for m in items if m.peak_memory_mb is not None]
        summary = Summary(runner, cfg, statistics.median(rates), rates, max(peaks) if peaks else None)
        quiet = [m.quiet_images_per_s for m in items if m.quiet_images_per_s is not None]
        if quiet:
            summary.extra.update(quiet_images_per_s=statistics.median(quiet), quiet_samples=quiet)
        if runner == "fit" and ("loop", cfg) in groups:
            summary.ratio_to_loop = _paired_ratio(items, groups[("loop", cfg)])
            summary.extra["ratio_to_loop_quiet"] = _paired_ratio(items, groups[("loop", cfg)], quiet=True)
        baseline = _baseline_config(cfg, first_config)
        if baseline is not None and baseline != cfg and (runner, baseline) in groups:
            summary.ratio_to_baseline = _paired_ratio(items, groups[(runner, baseline)])
            summary.extra["ratio_to_baseline_quiet"] = _paired_ratio(items, groups[(runner, baseline)], quiet=True)
        summaries.append(summary)
    config_order = {cfg: i for i, cfg in enumerate(dict.fromkeys(m.config for m in measurements))}
    return sorted(summaries, key=lambda s: (config_order[s.config], RUNNERS.index(s.runner)))


def _baseline_config(cfg: BenchConfig, first: BenchConfig | None) -> BenchConfig | None:
    """The reference of a speedup: the same config with the first precision, memory format and compile flag."""
    if first is None:
        return None
    return replace(cfg, precision=first.precision, memory_format=first.memory_format, compile=first.compile)


def _paired_ratio(items: Sequence[Measurement], reference: Sequence[Measurement], quiet: bool = False) -> float | None:
    """Median over repeats of ``items[repeat] / reference[repeat]`` (runs next to each other in time)."""

    def rate(m: Measurement) -> float | None:
        return m.quiet_images_per_s if quiet else m.images_per_s

    by_repeat = {m.repeat: rate(m) for m in reference}
    ratios = [a / b for m in items if (a := rate(m)) and (b := by_repeat.get(m.repeat))]
    return statistics.median(ratios) if ratios else None


def format_table(summaries: Sequence[Summary]) -> str:
    header = (
        "runner",
        "model",
        "px",
        "batch",
        "precision",
        "format",
        "compile",
        "data",
        "images/s",
        "quiet",
        "min-max",
        "peak MB",
        "fit/loop",
        "quiet",
        "vs base",
        "quiet",
    )
    rows = [header]
    for s in summaries:
        c = s.config
        per_worker = ""
        if s.runner == "pipeline" and c.loader == "dataloader" and c.num_workers > 1:
            per_worker = f" ({s.images_per_s / c.num_workers:,.0f}/worker)"
        rows.append(
            (
                s.runner,
                c.model if s.runner != "pipeline" else "-",
                str(c.image_size),
                str(c.batch_size),
                c.precision if s.runner != "pipeline" else "-",
                c.memory_format if s.runner != "pipeline" else "-",
                "yes" if c.compile else "no",
                c.data_label(),
                f"{s.images_per_s:,.1f}{per_worker}",
                _fmt(s.extra.get("quiet_images_per_s"), "{:,.1f}"),
                f"{min(s.samples):,.0f}-{max(s.samples):,.0f}",
                f"{s.peak_memory_mb:,.0f}" if s.peak_memory_mb is not None else "-",
                f"{s.ratio_to_loop:.3f}" if s.ratio_to_loop is not None else "",
                _fmt(s.extra.get("ratio_to_loop_quiet"), "{:.3f}"),
                f"{s.ratio_to_baseline:.2f}x" if s.ratio_to_baseline is not None else "",
                _fmt(s.extra.get("ratio_to_baseline_quiet"), "{:.2f}x"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _csv(kind: type, choices: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = []
        for item in text.split(","):
            item = item.strip()
            value = (item.lower() in ("1", "true", "yes", "on")) if kind is bool else kind(item)
            if choices is not None and value not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(map(str, choices))}")
            values.append(value)
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet-lit benchmark",
        description="Training images/s and peak memory of resnet-lit fit beside a hand-written PyTorch loop. "
        "Comma-separated values multiply the configurations.",
    )
    parser.add_argument("--model", type=_csv(str), default=["resnet20"], help="zoo architecture(s)")
    parser.add_argument("--image-size", type=_csv(int), default=[32])
    parser.add_argument("--batch-size", type=_csv(int), default=[128])
    parser.add_argument("--precision", type=_csv(str, PRECISIONS), default=["32-true"])
    parser.add_argument("--memory-format", type=_csv(str, MEMORY_FORMATS), default=["channels_last"])
    parser.add_argument("--compile", type=_csv(bool), default=[False], help="true, false or both: false,true")
    parser.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder root (root/train/...)")
    parser.add_argument(
        "--loader",
        type=_csv(str, ("device", "dataloader")),
        default=None,
        help="data path of fit/pipeline (default: device for synthetic, dataloader for folders)",
    )
    parser.add_argument("--num-workers", type=_csv(int), default=[0], help="DataLoader workers (dataloader path)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--runners", type=_csv(str, RUNNERS), default=["loop", "fit"])
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (use more with --compile)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every run")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    parser.add_argument(
        "--no-interleave",
        dest="interleave",
        action="store_false",
        help="on CPUs, run loop and fit one after the other instead of taking turns step by step",
    )
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaders = args.loader or (["device"] if args.data == "synthetic" else ["dataloader"])
    if args.data != "synthetic" and not os.path.isdir(args.data):
        raise SystemExit(f"resnet-lit benchmark: error: --data {args.data!r} is neither 'synthetic' nor a folder")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("resnet-lit benchmark: error: --warmup, --steps and --repeats must be at least 1")
    configs = [
        BenchConfig(
            model=model,
            image_size=size,
            batch_size=batch,
            precision=precision,
            memory_format=fmt,
            compile=compiled,
            data=args.data,
            loader=loader,
            num_workers=workers if loader == "dataloader" else 0,
            num_classes=args.num_classes,
            device=device,
            cudnn_benchmark=args.cudnn_benchmark,
        )
        for model, size, batch, precision, fmt, compiled, loader, workers in itertools.product(
            args.model,
            args.image_size,
            args.batch_size,
            args.precision,
            args.memory_format,
            args.compile,
            loaders,
            args.num_workers,
        )
    ]
    configs = list(dict.fromkeys(configs))  # workers only vary the dataloader path
    info = machine_info(device)
    print(
        f"# {info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads)"
        f"{', ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}, lightning {info['lightning']}; "
        f"load average {info['load_average']}",
        file=sys.stderr,
    )
    measurements = measure(
        configs,
        args.runners,
        warmup=args.warmup,
        steps=args.steps,
        repeats=args.repeats,
        interleave=args.interleave,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    summaries = summarize(measurements)
    print(format_table(summaries))
    if args.json:
        info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        result = {
            "command": " ".join(["resnet-lit benchmark", *(argv if argv is not None else sys.argv[1:])]),
            "machine": info,
            "warmup": args.warmup,
            "steps": args.steps,
            "repeats": args.repeats,
            "results": [{**asdict(s), "config": asdict(s.config)} for s in summaries],
            "measurements": [{**asdict(m), "config": asdict(m.config)} for m in measurements],
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: the CLI instantiates resnet_lit.bench.StepTimer.
    from resnet_lit.bench import main as _main

    raise SystemExit(_main())
