"""The `fit` runner: `resnet-lit fit` itself, with its defaults, timed by `StepTimer` from inside.

Every default callback, the logger and the progress bar run, so their per-step cost is measured. What a run
does between epochs is not part of a training step's cost, and on a GPU loan it eats the budget: the runner
turns validation off (`limit_val_batches: 0`) and lets the checkpoint callback save nothing (no `last.ckpt`,
no epoch-end or interval saves; its per-step hook still runs). The timed steps fit in one epoch where the
synthetic data set fits in `SYNTHETIC_DATA_BYTES`.
"""

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

# How much synthetic float32 data the `fit` runner generates (on the host, then held on the device): enough
# batches for warm-up and timed steps in one epoch where this allows. 4 GiB on GPUs is 26 batches of
# ResNet-50 at 224 px and batch 256 (a few seconds to generate); 2 GiB on CPUs.
SYNTHETIC_DATA_BYTES = {"cpu": 2 << 30, "cuda": 4 << 30}

# The checkpoint callback with every save turned off: no `last.ckpt`, no epoch-end, interval or top-k files.
NO_CHECKPOINTS = {"save_last": False, "save_top_k": 0, "every_n_epochs": 0, "every_n_train_steps": None}


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
    """The `resnet-lit fit` config of a run: the defaults, plus the data, model and precision of ``cfg``, without
    validation and without checkpoint saves (neither belongs to a training step; see the module docstring)."""
    on_gpu = cfg.device.startswith("cuda")
    if cfg.data == "synthetic":
        # Enough batches that the timed steps fit in one epoch where memory allows; otherwise StepTimer
        # leaves out the steps that span epoch boundaries.
        per_image = 3 * cfg.image_size**2 * 4
        data_bytes = SYNTHETIC_DATA_BYTES["cuda" if on_gpu else "cpu"]
        num_batches = max(2, min(warmup + steps + 1, data_bytes // (per_image * cfg.batch_size)))
        data = {"class_path": "resnet_lit.data.SyntheticDataModule", "init_args": synthetic_data_args(cfg, num_batches)}
    else:
        data = {"class_path": "resnet_lit.data.ImageFolderDataModule", "init_args": folder_data_args(cfg)}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if on_gpu else "cpu",
            "devices": 1,
            "precision": cfg.precision,
            "max_epochs": -1,
            "max_steps": 10**9,  # StepTimer stops the run
            "limit_val_batches": 0,  # no validation (nor sanity check) between or after the timed steps
            "default_root_dir": root,
            "benchmark": cfg.cudnn_benchmark if on_gpu else None,
            "callbacks": [
                {"class_path": "resnet_lit.bench.StepTimer", "init_args": {"warmup": warmup, "steps": steps}}
            ],
        },
        "checkpoint": dict(NO_CHECKPOINTS),
        "model": {"arch": cfg.model, "channels_last": cfg.memory_format == "channels_last", "compile": cfg.compile},
        "data": data,
    }
