"""No host sync and no collective on an ordinary training step, audited in a real 2-process gloo DDP `fit`.

`tests/sync_audit.py` records, in each process, every `.item()/.tolist()/.cpu()/.numpy()/bool()` of a tensor,
`torch.unique` and `torch.distributed` collective made while the training loop runs a batch, under the batch's
global step, with its call site. A step is "logging" when Lightning writes step logs after it (every
`log_every_n_steps`), "checkpoint" when a checkpoint is saved in it, else "ordinary". On CPU every tensor is a
host tensor, so the audit counts calls, not actual device waits; they would be waits on a GPU.

The run plants one `.item()` in a callback, at one ordinary step of rank 1, to show that the audit catches it:
that call must be the only one reported on an ordinary step. The preemption handler agrees on signals at
logging steps and, in between, about every `agree_every_seconds`; the run sets that to a minute, so that where
the agreements fall does not depend on how fast this machine is (the schedule is tested on its own below).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

import resnet_lit.callbacks.progress_bar as progress_bar
import resnet_lit.fault_tolerance.preemption as preemption
from resnet_lit.callbacks.progress_bar import ThrottledProgressBar
from resnet_lit.cli import ResNetLitCLI
from resnet_lit.fault_tolerance import Preempted, PreemptionHandler, ResumableCheckpoint
from resnet_lit.module import MeanCrossEntropy, ResNetClassifier

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, CHECKPOINT_EVERY = 12, 4, 5
PLANTED_STEP = 5  # 0-based: neither a logging step (3, 7, 11) nor a checkpoint step (4, 9)
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip
FIT = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.accelerator", "cpu",
       "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.batch_size", "32",
       "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", str(LOG_EVERY),
       "--checkpoint.every_n_train_steps", str(CHECKPOINT_EVERY), "--trainer.num_sanity_val_steps", "0",
       "--trainer.enable_model_summary", "false", "--trainer.callbacks+=test_sync_audit.AgreeEveryMinute",
       "--trainer.callbacks+=test_sync_audit.PlantedItem", f"--trainer.callbacks.step={PLANTED_STEP}"]  # fmt: skip


class AgreeEveryMinute(Callback):
    """Sets the default PreemptionHandler's `agree_every_seconds` to 60 before training starts."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, PreemptionHandler):
                callback.agree_every_seconds = 60.0


class PlantedItem(Callback):
    """Calls `.item()` on the training loss in training step `step` (0-based) on rank `rank`: a host sync the
    audit must report."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step + 1 and trainer.global_rank == self.rank:
            outputs["loss"].item()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The audit of each rank: {rank: {"steps": {step: {"kind", "calls"}}, ...}}."""
    root = tmp_path_factory.mktemp("sync_audit")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    env.update(RESNET_LIT_SYNC_AUDIT=str(root), MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")])))  # fmt: skip
    command = [sys.executable, str(REPO / "tests" / "sync_audit.py"), *FIT, "--trainer.default_root_dir", str(root)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return {rank: json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _counted(report: dict[str, Any], kind: str) -> dict[int, list[dict[str, Any]]]:
    """Per step of this kind, the calls that are not excluded."""
    return {
        int(step): [call for call in entry["calls"] if not call["excluded"]]
        for step, entry in report["steps"].items()
        if entry["kind"] == kind
    }


def _sites(calls: list[dict[str, Any]]) -> set[str]:
    return {f"{call['what']} {call['site'].split(':')[0]}" for call in calls}


@pytest.mark.timeout(300)
def test_ordinary_ddp_training_steps_make_no_host_sync_and_no_collective(reports: dict[int, dict]) -> None:
    for rank, report in reports.items():
        kinds = {int(step): entry["kind"] for step, entry in report["steps"].items()}
        assert kinds == {
            # the last step saves too: training stops there (max_steps), mid-epoch
            step: "checkpoint" if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == STEPS else
            "logging" if (step + 1) % LOG_EVERY == 0 else "ordinary"
            for step in range(STEPS)
        }  # fmt: skip
        ordinary = _counted(report, "ordinary")
        if rank == 1:
            ordinary.pop(PLANTED_STEP)  # see the next test
        calls = {step: sorted(_sites(calls)) for step, calls in ordinary.items() if calls}
        assert not calls, f"rank {rank}: calls on ordinary steps: {calls}"

        # The audit sees what it excludes: Lightning's SIGTERM broadcast before every batch ...
        for entry in report["steps"].values():
            assert {c["what"] for c in entry["calls"] if "SIGTERM" in (c["excluded"] or "")} == {"dist.broadcast",
                                                                                                  "item"}  # fmt: skip
        # ... and the syncs of the logging steps: the global train/loss, the non-finite check (through
        # Lightning's reduce), the preemption agreement (gloo), the logger's conversion.
        for calls in _counted(report, "logging").values():
            assert {"dist.all_reduce lightning/fabric/utilities/distributed.py", "cpu resnet_lit/module.py",
                    "dist.all_reduce resnet_lit/fault_tolerance/distributed.py",
                    "item resnet_lit/fault_tolerance/distributed.py"} <= _sites(calls)  # fmt: skip


@pytest.mark.timeout(300)
def test_the_audit_catches_a_planted_item_call(reports: dict[int, dict]) -> None:
    (call,) = _counted(reports[1], "ordinary")[PLANTED_STEP]
    assert call["what"] == "item" and call["site"].startswith("tests/test_sync_audit.py:")
    assert call["site"].endswith(" on_train_batch_end")
    assert not _counted(reports[0], "ordinary")[PLANTED_STEP]  # rank 0 did not plant it


# --- the preemption agreement schedule ------------------------------------------------------------------------
class _Trainer:
    """What the training-step path of PreemptionHandler reads from the Trainer."""

    def __init__(self, log_every_n_steps: int) -> None:
        self.global_step, self.current_epoch, self.is_global_zero = 0, 0, True
        self.log_every_n_steps, self.accumulate_grad_batches, self.is_last_batch = log_every_n_steps, 1, False
        self.loggers: list[Any] = []


def _agreements(monkeypatch: pytest.MonkeyPatch, handler: PreemptionHandler, seconds_per_step: float,
                steps: int = 100, signal_at: int | None = None) -> tuple[list[int], int | None]:  # fmt: skip
    """Run `steps` training steps of `seconds_per_step` each; the steps after which the ranks agreed, and the
    step at which the run stopped (None: it did not)."""
    clock = [0.0]
    agreed: list[int] = []
    trainer = _Trainer(log_every_n_steps=50)

    def host_max_each(trainer: Any, values: list[int], group: Any) -> list[int]:
        agreed.append(trainer.global_step)
        return list(values)

    monkeypatch.setattr(preemption, "_now", lambda: clock[0])
    monkeypatch.setattr(preemption, "host_max_each", host_max_each)
    monkeypatch.setattr(preemption, "save_last_checkpoint", lambda trainer: "last.ckpt")
    monkeypatch.setattr(preemption, "host_barrier", lambda group: None)
    handler._group = object()  # two ranks or more (a single process acts after every step)
    handler._schedule(trainer, handler.agree_every_n_steps or preemption.FIRST_AGREEMENT_STEPS)  # as at train start
    for step in range(steps):
        if step == signal_at:
            handler._signum = signal.SIGTERM  # what the signal handler records
        clock[0] += seconds_per_step
        trainer.global_step = step + 1  # the optimizer step is done
        try:
            handler.on_train_batch_end(trainer, None, None, None, step)  # type: ignore[arg-type]
        except Preempted:
            return agreed, trainer.global_step
    return agreed, None


def test_ranks_agree_on_signals_at_logging_steps_and_every_few_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.25 s per step, about every 3 s: after the first 10 steps, then every 12, and at every 50th (logging).
    agreed, _ = _agreements(monkeypatch, PreemptionHandler(agree_every_seconds=3.0), 0.25)
    assert agreed == [10, 22, 34, 46, 50, 62, 74, 86, 98, 100]
    # Steps slower than the 3 s: after every step.
    agreed, _ = _agreements(monkeypatch, PreemptionHandler(agree_every_seconds=3.0), 2.0, steps=20)
    assert agreed == [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    # A fixed interval instead of the measured one.
    agreed, _ = _agreements(monkeypatch, PreemptionHandler(agree_every_n_steps=30), 0.25)
    assert agreed == [30, 50, 80, 100]


def test_a_signal_stops_the_run_at_the_next_agreement(monkeypatch: pytest.MonkeyPatch) -> None:
    _, stopped = _agreements(monkeypatch, PreemptionHandler(agree_every_seconds=3.0), 0.25, signal_at=23)
    assert stopped == 34  # the agreement after the signal, at most about 3 s later
    _, stopped = _agreements(monkeypatch, PreemptionHandler(agree_every_n_steps=1), 0.25, signal_at=23)
    assert stopped == 24  # after the step during which it came


# --- metrics, progress bar, time-based checkpoints ----------------------------------------------------------------
@contextmanager
def no_host_reads() -> Iterator[None]:
    """Any read of a tensor's values on the host (or `torch.unique`) raises."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a host sync")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch, "unique", refuse)
        yield


def test_metric_updates_never_read_values_on_the_host() -> None:
    model = ResNetClassifier(num_classes=10)
    logits, targets = torch.randn(6, 10), torch.randint(0, 10, (6,))
    with no_host_reads():
        model.train_metrics.update(logits, targets)
        model.val_metrics.update(logits, targets)  # loss, accuracy, top-5 accuracy
    assert model.val_metrics["loss"].compute() == pytest.approx(F.cross_entropy(logits, targets).item())


def test_eval_loss_is_the_mean_over_samples_and_a_nan_loss_shows() -> None:
    loss = MeanCrossEntropy()
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    loss.update(logits[:3], targets[:3])
    loss.update(logits[3:], targets[3:])  # batches of 3 and 1 images: a mean of batch means would be off
    assert loss.compute().item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    loss.update(torch.full((2, 10), float("nan")), targets[:2])
    assert torch.isnan(loss.compute())  # not dropped from the mean


def test_cli_progress_bar_redraws_a_few_times_per_second_unless_configured(tmp_path: Path) -> None:
    run = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    assert type(ResNetLitCLI(args=run, run=False).trainer.progress_bar_callback) is ThrottledProgressBar
    own = ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.callbacks.refresh_rate=7"]
    bar = ResNetLitCLI(args=[*run, *own], run=False).trainer.progress_bar_callback
    assert type(bar) is TQDMProgressBar and bar.refresh_rate == 7
    off = ResNetLitCLI(args=[*run, "--trainer.enable_progress_bar", "false"], run=False)
    assert off.trainer.progress_bar_callback is None


def test_throttled_progress_bar_draws_every_quarter_second_and_the_last_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    drawn: list[int] = []
    monkeypatch.setattr(progress_bar.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", lambda self, *args: drawn.append(args[-1]))
    bar = ThrottledProgressBar(min_interval=0.25)
    bar.train_progress_bar = SimpleNamespace(total=100)
    for batch_idx in range(100):  # 100 steps per second
        clock[0] += 0.01
        bar.on_train_batch_end(None, None, None, None, batch_idx)  # type: ignore[arg-type]
    assert drawn == [0, 25, 50, 75, 99]


def test_time_based_checkpoints_are_decided_at_logging_steps_only(tmp_path: Path) -> None:
    """`train_time_interval` needs rank 0's clock broadcast to all ranks: a collective, not after every step."""
    callback = ResumableCheckpoint(dirpath=tmp_path, save_last=True, train_time_interval=timedelta(0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=7, log_every_n_steps=3, callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    broadcasts: list[int] = []
    broadcast = trainer.strategy.broadcast

    def counted(obj: Any, src: int = 0) -> Any:
        broadcasts.append(trainer.global_step)
        return broadcast(obj, src)

    trainer.strategy.broadcast = counted  # type: ignore[method-assign]
    trainer.fit(BoringModel())
    assert [step for step in broadcasts if 0 < step < 7] == [3, 6]  # (step 0: the setup's broadcasts)
