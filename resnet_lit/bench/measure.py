"""Runs every (configuration, runner) pair, repeat after repeat, taking turns so that a shared machine's load
hits all of them alike, and records one `Measurement` per run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from resnet_lit.bench.config import BenchConfig, Measurement, RunResult
from resnet_lit.bench.fit import run_fit, run_fit_and_loop
from resnet_lit.bench.loop import run_loop, run_loops_interleaved
from resnet_lit.bench.pipeline import run_pipeline

RUN: dict[str, Callable[[BenchConfig, int, int], RunResult]] = {
    "loop": run_loop,
    "fit": run_fit,
    "pipeline": run_pipeline,
}


def measure(
    configs: Sequence[BenchConfig],
    runners: Sequence[str],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    interleave: bool = True,
    log: Any = print,
    on_measurement: Callable[[list[Measurement]], None] | None = None,
) -> list[Measurement]:
    """Run every (config, runner) ``repeats`` times: repeat 1 of all, then repeat 2 of all, ...

    ``on_measurement`` gets the measurements so far after each run (e.g. to write them out, so that a run
    killed later, say by `timeout`, keeps the finished ones).

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
        if on_measurement is not None:
            on_measurement(measurements)

    interleave = interleave and all(torch.device(cfg.device).type == "cpu" for cfg in configs)
    for repeat in range(repeats):
        if not interleave:
            for cfg in configs:
                for runner in runners:
                    record(runner, cfg, RUN[runner](cfg, warmup, steps), repeat)
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
