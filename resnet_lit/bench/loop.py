"""The `loop` runner: a minimal hand-written PyTorch training loop, the baseline that `fit` is compared with."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from resnet_lit.bench.config import BenchConfig, RunResult
from resnet_lit.bench.pipeline import datamodule, endless, synthetic_batches
from resnet_lit.bench.timing import PeakMemory, sync
from resnet_lit.models import create_model


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a Lightning precision name (none for full precision)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


class LoopStepper:
    """The hand-written training loop, one ``step()`` at a time: the zoo network, SGD, cross-entropy, autocast."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.device = torch.device(cfg.device)
        self.cfg = cfg
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        torch.manual_seed(0)
        self.memory_format = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
        self.model = create_model(cfg.model, num_classes=cfg.num_classes).to(
            self.device, memory_format=self.memory_format
        )
        if cfg.compile:
            self.model.compile()
        # The module's default optimizer.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "16-mixed")
        self.batches: Iterator[tuple[Tensor, Tensor]]
        if cfg.data == "synthetic":
            self.batches = itertools.cycle(synthetic_batches(cfg, self.device))
        else:
            self.batches = endless(datamodule(cfg, 0), self.device)
        self.model.train()

    def step(self) -> None:
        images, targets = next(self.batches)
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with autocast(self.cfg.precision, self.device):
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
        sync(device)
        memory = PeakMemory(device)
        memory.start()
        if device.type != "cpu":  # one configuration: the total time, no sync per step
            start = time.perf_counter()
            for _ in range(steps):
                steppers[0].step()
            sync(device)
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
