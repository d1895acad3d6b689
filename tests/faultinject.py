"""Test-only callbacks that inject faults into real CLI runs (`--trainer.callbacks+=faultinject.X`).

Subprocess runs find this module through PYTHONPATH=tests (see `fault_env` in the tests).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class Crash(RuntimeError):
    """The simulated crash of `CrashAtStep`."""


class CrashAtStep(Callback):
    """Raise `Crash` just before training step `step` (0-based global step), like a process dying there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"injected crash before step {self.step}")


class StopAtStep(Callback):
    """Set `trainer.should_stop` after training step `step` (its 1-based global step), as Lightning's Timer does
    when `trainer.max_time` runs out."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class NaNAtStep(Callback):
    """Turn the images of training step `step` into NaN (on `rank`, or every rank), so the loss is NaN.

    Records the network's parameters and buffers around that step in `before` / `after` (CPU copies).
    """

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank
        self.before: dict[str, torch.Tensor] | None = None
        self.after: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or (self.rank is not None and trainer.global_rank != self.rank):
            return
        self.before = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}
        batch[0].fill_(float("nan"))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.before is not None and self.after is None:
            self.after = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}


class SlowSteps(Callback):
    """Sleep `seconds` after each training step, so that a test can signal a run in the middle of training."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.seconds)


# --- running the CLI --------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# The quickstart as the step-counting and loss-comparing tests know it: batches of 64 (19 steps per epoch) in float32.
# The shipped recipe trains at batch 128 with precision: auto (bf16 where the CPU has it), which is faster.
AS_TESTED = ["--data.init_args.batch_size", "64", "--trainer.precision", "32-true"]
# The resume-parity job: quickstart (ResNet-20 on the digits, 19 steps per epoch) for 2 epochs, with drop-path
# so that the random stream matters, deterministic algorithms and a checkpoint every 5 steps.
PARITY_FIT = ["fit", "--config", QUICKSTART, *AS_TESTED, "--model.net.drop_path", "0.1",
              "--trainer.deterministic", "true", "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "5",
              "--trainer.log_every_n_steps", "2", *QUIET]  # fmt: skip
STEPS_PER_EPOCH = 19
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def fault_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m resnet_lit` subprocesses: no launcher/SLURM variables, tests/ importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "resnet_lit", *args]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until `path` exists; fail with the process output if it exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(
                f"exited with {process.returncode} before {path} appeared:\n{out[-2000:]}{err[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def last_metric(metrics_csv: Path, key: str) -> float:
    with open(metrics_csv) as f:
        values = [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    assert values, f"{key} never logged in {metrics_csv}"
    return values[-1]


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
