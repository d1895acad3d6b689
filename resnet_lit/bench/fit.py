"""The `fit` runner: `resnet-lit fit` itself, with all of its defaults, timed by `StepTimer` from inside."""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import torch
import yaml

from resnet_lit.bench.config import BenchConfig, RunResult
from resnet_lit.bench.loop import LoopStepper
from resnet_lit.bench.pipeline import folder_data_args, synthetic_data_args
from resnet_lit.bench.timing import StepTimer
from resnet_lit.training_cli import ResNetLitCLI


def run_fit(cfg: BenchConfig, warmup: int, steps: int) -> RunResult:
    """`resnet-lit fit` with its defaults, timed by :class:`StepTimer`."""
    return run_fit_and_loop(cfg, warmup, steps, with_loop=False)[0]


def run_fit_and_loop(cfg: BenchConfig, warmup: int, steps: int, with_loop: bool = True) -> list[RunResult]:
    """`resnet-lit fit`, and (``with_loop``, CPU) a hand-written loop step after each of its steps.

    The loop's step runs inside :class:`StepTimer`'s batch-end hook and is timed apart from the fit's step, so
    both see the same moments of a shared machine's load.
    """
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    with tempfile.TemporaryDirectory(prefix="resnet-lit-bench-") as root:
        path = os.path.join(root, "bench.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(fit_config(cfg, warmup, steps, root), f)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli = ResNetLitCLI(args=["--config", path], run=False)
        timer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, StepTimer))
        loop = LoopStepper(cfg) if with_loop else None
        timer.companion = loop
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            if loop is not None:
                loop.close()
        if not timer.done:
            raise RuntimeError(f"fit stopped after {timer.timed_steps} of {steps} timed steps")
        results = [RunResult(timer.seconds, timer.timed_steps, timer.peak_memory_mb, timer.step_seconds)]
        if with_loop:
            loop_times = timer.companion_seconds
            results.append(RunResult(sum(loop_times), len(loop_times), timer.peak_memory_mb, loop_times))
        return results


def fit_config(cfg: BenchConfig, warmup: int, steps: int, root: str) -> dict[str, Any]:
    """The `resnet-lit fit` config of a run: the defaults, plus the data, model and precision of ``cfg``."""
    if cfg.data == "synthetic":
        # Enough batches that the timed steps fit in one epoch where memory allows; otherwise StepTimer
        # skips the steps that span epoch boundaries.
        per_image = 3 * cfg.image_size**2 * 4
        num_batches = max(2, min(warmup + steps + 1, (2 << 30) // (per_image * cfg.batch_size)))
        data = {"class_path": "resnet_lit.data.SyntheticDataModule", "init_args": synthetic_data_args(cfg, num_batches)}
    else:
        data = {"class_path": "resnet_lit.data.ImageFolderDataModule", "init_args": folder_data_args(cfg)}
    on_gpu = cfg.device.startswith("cuda")
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if on_gpu else "cpu",
            "devices": 1,
            "precision": cfg.precision,
            "max_epochs": -1,
            "max_steps": 10**9,  # StepTimer stops the run
            "default_root_dir": root,
            "benchmark": cfg.cudnn_benchmark if on_gpu else None,
            "callbacks": [
                {"class_path": "resnet_lit.bench.StepTimer", "init_args": {"warmup": warmup, "steps": steps}}
            ],
        },
        "model": {"arch": cfg.model, "channels_last": cfg.memory_format == "channels_last", "compile": cfg.compile},
        "data": data,
    }
