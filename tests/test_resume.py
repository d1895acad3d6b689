"""Exact resume: a run interrupted anywhere and resumed with `--ckpt_path last` ends where the uninterrupted
run ends (final val/loss to 1e-6), after an in-process crash, a real SIGKILL, SIGTERM and SLURM's SIGUSR1.

All runs are the PARITY_FIT job (quickstart for 2 epochs = 38 steps, drop-path 0.1, checkpoints every 5 steps).
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from faultinject import (
    LAUNCHER_VARS,
    PARITY_FIT,
    STEPS_PER_EPOCH,
    Crash,
    checkpoint_step,
    cli_command,
    fault_env,
    last_metric,
    wait_for,
)
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from resnet_lit.cli import ResNetLitCLI
from resnet_lit.fault_tolerance import (
    CorruptImageReport,
    NonFiniteLossPolicy,
    Preempted,
    PreemptionHandler,
    RankStateCheckpoint,
    ResumableCheckpoint,
    RunFolderLock,
)
from resnet_lit.fault_tolerance.checkpoint_io import AtomicCheckpointIO
from resnet_lit.fault_tolerance.checkpointing import in_gradient_accumulation
from resnet_lit.fault_tolerance.rng_state import (
    CHECKPOINT_KEY,
    capture_metric_states,
    capture_rng_state,
    restore_metric_states,
    restore_rng_state,
)

TOTAL_STEPS = 2 * STEPS_PER_EPOCH
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The reference: the parity job run once without interruption (in this process)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cli = ResNetLitCLI(args=[*PARITY_FIT, "--trainer.default_root_dir", str(root)])
    assert cli.trainer.global_step == TOTAL_STEPS
    assert checkpoint_step(root / "checkpoints" / "last.ckpt") == TOTAL_STEPS  # last.ckpt is current at the end
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def test_fit_installs_the_fault_tolerance_pieces(tmp_path: Path) -> None:
    cli = ResNetLitCLI(args=[*PARITY_FIT[1:], "--trainer.default_root_dir", str(tmp_path)], run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    for kind in (RankStateCheckpoint, PreemptionHandler, CorruptImageReport, NonFiniteLossPolicy, ResumableCheckpoint):
        assert kinds.count(kind) == 1, kind
    assert kinds.count(RunFolderLock) == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


class _OwnPreemption(PreemptionHandler):
    """A user's variant of a fault-tolerance callback."""


def test_configured_callbacks_and_checkpoint_io_take_the_place_of_the_defaults(tmp_path: Path) -> None:
    run = [*PARITY_FIT[1:], "--trainer.default_root_dir", str(tmp_path)]
    configured = ["--trainer.callbacks+=test_resume._OwnPreemption",
                  "--trainer.callbacks+=resnet_lit.fault_tolerance.RankStateCheckpoint",
                  "--trainer.plugins+=lightning.pytorch.plugins.io.AsyncCheckpointIO"]  # fmt: skip
    cli = ResNetLitCLI(args=[*run, *configured], run=False)
    kinds = [type(cb) for cb in cli.trainer.callbacks]
    assert _OwnPreemption in kinds and PreemptionHandler not in kinds  # a subclass replaces the default
    assert kinds.count(RankStateCheckpoint) == 1 and CorruptImageReport in kinds
    assert isinstance(cli.trainer.strategy.checkpoint_io, AsyncCheckpointIO)

    # A plugin that is no CheckpointIO keeps the atomic writes; the defaults are fresh objects for every CLI.
    environment = "--trainer.plugins+=lightning.fabric.plugins.environments.LightningEnvironment"
    again = ResNetLitCLI(args=[*run, environment], run=False)
    assert isinstance(again.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert not {id(cb) for cb in again.trainer.callbacks} & {id(cb) for cb in cli.trainer.callbacks}


def test_resume_from_nothing_and_mid_epoch_without_resume_warnings_or_global_filters(tmp_path: Path) -> None:
    run = [*PARITY_FIT, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"]
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ResNetLitCLI(args=[*run, "--trainer.max_steps", "5"])  # nothing to resume yet: a new run
        assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 5  # mid-epoch
        resumed = ResNetLitCLI(args=[*run, "--trainer.max_steps", "7"])
    assert resumed.trainer.global_step == 7
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "no last checkpoint" in m or "ended before the epoch ended" in m], messages
    assert warnings.filters == filters  # no process-wide filter left behind


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crash_step", "saved_step"),
    [(STEPS_PER_EPOCH, STEPS_PER_EPOCH), (13, 10)],
    ids=["epoch-boundary", "mid-epoch"],
)
def test_crash_and_resume_matches_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, float], crash_step: int, saved_step: int
) -> None:
    run = [*PARITY_FIT, "--trainer.default_root_dir", str(tmp_path)]
    with pytest.raises(Crash):
        ResNetLitCLI(
            args=[*run, "--trainer.callbacks+=faultinject.CrashAtStep", f"--trainer.callbacks.step={crash_step}"]
        )
    last = tmp_path / "checkpoints" / "last.ckpt"
    # Step 10 is in the first epoch, before any validation: the step checkpoint did not wait for val/acc.
    assert checkpoint_step(last) == saved_step
    saved = torch.load(last, map_location="cpu", weights_only=True)[CHECKPOINT_KEY]
    assert saved["world_size"] == 1 and set(saved["ranks"][0]["rng"]) == {"torch", "cuda", "numpy", "python"}

    resumed = ResNetLitCLI(args=[*run, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == TOTAL_STEPS
    metrics = {key: float(value) for key, value in resumed.trainer.callback_metrics.items()}
    assert metrics["val/loss"] == pytest.approx(uninterrupted["val/loss"], abs=TOLERANCE)
    assert metrics["val/acc"] == pytest.approx(uninterrupted["val/acc"], abs=TOLERANCE)
    # The epoch's training accuracy continues from the checkpoint's partial counts, on every rank.
    assert metrics["train/acc"] == pytest.approx(uninterrupted["train/acc"], abs=TOLERANCE)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [["--trainer.max_steps", "12"], ["--trainer.callbacks+=faultinject.StopAtStep", "--trainer.callbacks.step=12"]],
    ids=["max_steps", "should_stop"],
)
def test_a_run_stopped_mid_epoch_resumes_into_the_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, float], stop: list[str]
) -> None:
    """Stopped at step 12 of the first epoch, by `max_steps` or by a callback's `should_stop` (as the Timer of
    `max_time` stops), then resumed without the limit: the run finishes that epoch and the next and ends where the
    uninterrupted run ends. (The schedule's length is fixed, as the uninterrupted run's: it would otherwise follow
    max_steps.) Before, last.ckpt was the epoch-end save after the stop, which marks the epoch done, and the resumed
    run skipped to the next epoch (ending at step 31 of 38)."""
    run = [*PARITY_FIT, "--trainer.default_root_dir", str(tmp_path),
           "--model.lr_scheduler.init_args.total_steps", str(TOTAL_STEPS)]  # fmt: skip
    ResNetLitCLI(args=[*run, *stop])
    assert checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 12
    resumed = ResNetLitCLI(args=[*run, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == TOTAL_STEPS
    metrics = {key: float(value) for key, value in resumed.trainer.callback_metrics.items()}
    for key in ("val/loss", "val/acc", "train/acc"):
        assert metrics[key] == pytest.approx(uninterrupted[key], abs=TOLERANCE), key


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    import random as pyrandom

    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), pyrandom.random())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), pyrandom.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_metric_states_round_trip_through_public_torchmetrics_api() -> None:
    from torchmetrics import MeanMetric, MetricCollection
    from torchmetrics.classification import MulticlassAccuracy

    def module() -> torch.nn.Module:
        holder = torch.nn.Module()
        holder.metrics = MetricCollection({"acc": MulticlassAccuracy(3, average="micro"), "loss": MeanMetric()})
        return holder

    logits, targets = torch.randn(8, 3), torch.randint(0, 3, (8,))
    original = module()
    original.metrics["acc"].update(logits, targets)
    original.metrics["loss"].update(torch.tensor([0.5, 1.5]))
    saved = torch.load(_round_trip(capture_metric_states(original)), weights_only=True)

    resumed = module()
    resumed.metrics["acc"].update(logits[:2], targets[:2])  # stale work of the resumed run is replaced
    restore_metric_states(resumed, saved)
    for metrics in (original.metrics, resumed.metrics):  # both continue with the same batch
        metrics["acc"].update(logits[:4], targets[:4])
        metrics["loss"].update(torch.tensor([3.0]))
    expected = {name: value.item() for name, value in original.metrics.compute().items()}
    assert {name: value.item() for name, value in resumed.metrics.compute().items()} == pytest.approx(expected)


def _round_trip(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    ("env", "requeue"),
    [({}, None), ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "r50"}, signal.SIGUSR1),
     ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "interactive"}, None),
     ({"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "r50", "TORCHELASTIC_RUN_ID": "x"}, None)],
    ids=["plain", "slurm", "slurm-interactive", "torchrun-in-slurm"],
)  # fmt: skip
def test_single_device_requeue_signal_follows_lightnings_cluster_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], requeue: int | None
) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in LAUNCHER_VARS:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert PreemptionHandler()._requeue_signal(trainer) == requeue


def test_preemption_saves_through_a_plain_modelcheckpoint_too(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel

    from resnet_lit.fault_tolerance.preemption import save_last_checkpoint

    callback = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = Trainer(max_steps=3, callbacks=[callback], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(BoringModel())
    path = save_last_checkpoint(trainer)
    assert path == str(tmp_path / "last.ckpt") == callback.last_model_path
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == 3
    assert any(state.get("last_model_path") == path for state in saved["callbacks"].values())


class _Steps:
    """The trainer attributes that `in_gradient_accumulation` reads."""

    def __init__(self, accumulate: int, last: bool = False) -> None:
        self.accumulate_grad_batches, self.is_last_batch = accumulate, last


def test_no_checkpoint_or_preemption_stop_in_the_middle_of_a_gradient_accumulation() -> None:
    assert [in_gradient_accumulation(_Steps(3), i) for i in range(6)] == [True, True, False] * 2
    assert not in_gradient_accumulation(_Steps(3, last=True), 3)  # the epoch's last batch steps the optimizer
    assert not any(in_gradient_accumulation(_Steps(1), i) for i in range(3))


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches(tmp_path: Path, uninterrupted: dict[str, float]) -> None:
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 1.0)
    command = cli_command(*PARITY_FIT, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last")
    env = fault_env()
    process = subprocess.Popen(
        [*command, "--trainer.callbacks+=faultinject.SlowSteps"],  # >= 50 ms a step: time to kill it mid-run
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    last = tmp_path / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"not killed mid-run (delay {delay:.3f} s, seed {seed})"
    killed_at = checkpoint_step(last)  # loadable: the kill never leaves a partial last.ckpt
    assert 0 < killed_at < TOTAL_STEPS

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    assert checkpoint_step(last) == TOTAL_STEPS
    final = last_metric(tmp_path / "metrics.csv", "val/loss")
    assert final == pytest.approx(uninterrupted["val/loss"], abs=TOLERANCE), f"killed after step {killed_at}"


def _signal_mid_run(tmp_path: Path, signum: int, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start the parity job, send `signum` once the first checkpoint exists, return its result and command."""
    command = cli_command(*PARITY_FIT, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last")
    process = subprocess.Popen(
        [*command, "--trainer.callbacks+=faultinject.SlowSteps"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(tmp_path / "checkpoints" / "last.ckpt", process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), command


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_and_resumes(tmp_path: Path, uninterrupted: dict[str, float]) -> None:
    env = fault_env()
    stopped, command = _signal_mid_run(tmp_path, signal.SIGTERM, env)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    assert "preempted by SIGTERM" in output and "--ckpt_path last" in output
    saved_at = checkpoint_step(tmp_path / "checkpoints" / "last.ckpt")
    assert 5 <= saved_at < TOTAL_STEPS
    assert f"step {saved_at}; saved" in output  # the checkpoint is of the step at which it stopped

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = last_metric(tmp_path / "metrics.csv", "val/loss")
    assert final == pytest.approx(uninterrupted["val/loss"], abs=TOLERANCE)
    with open(tmp_path / "metrics.csv") as f:  # the resumed run continued the log instead of replacing it
        logged_steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert min(logged_steps) < saved_at and max(logged_steps) >= TOTAL_STEPS - 2


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_through_scontrol_and_resumes(
    tmp_path: Path, uninterrupted: dict[str, float]
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "r50", "SLURM_JOB_ID": "4242",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    env = fault_env(PATH=f"{bin_dir}:{fault_env()['PATH']}", **slurm)
    run_dir = tmp_path / "run"
    stopped, command = _signal_mid_run(run_dir, signal.SIGUSR1, env)
    output = stopped.stdout + stopped.stderr
    assert stopped.returncode == 128 + signal.SIGUSR1, output[-3000:]
    assert "preempted by SIGUSR1" in output and "Traceback" not in output
    assert calls.read_text().split() == ["requeue", "4242"]
    assert 5 <= checkpoint_step(run_dir / "checkpoints" / "last.ckpt") < TOTAL_STEPS
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's in-handler SLURM save is replaced

    # The requeued job runs the same command in the same environment.
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_metric(run_dir / "metrics.csv", "val/loss") == pytest.approx(uninterrupted["val/loss"], abs=TOLERANCE)


class _FakeTrainer:
    global_step, current_epoch, is_global_zero, loggers = 7, 0, True, ()


def test_preemption_is_agreed_over_ranks_and_requeue_outranks_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    import resnet_lit.fault_tolerance.preemption as preemption

    saved: list[int] = []
    requeued: list[int] = []
    others: list[int] = []  # what the other ranks contribute to the all-reduce(max)
    monkeypatch.setattr(preemption, "host_max_each", lambda trainer, values, group: [max(values[0], *others), 0])
    monkeypatch.setattr(preemption, "save_last_checkpoint", lambda trainer: saved.append(1) or "last.ckpt")
    monkeypatch.setattr(preemption, "requeue_slurm_job", lambda: requeued.append(1) or 0)
    handler = PreemptionHandler()
    handler._requeue_signum = signal.SIGUSR1

    others[:] = [0]
    handler._maybe_stop(_FakeTrainer())  # no rank was signalled: nothing happens
    assert not saved

    others[:] = [signal.SIGTERM]  # this rank saw nothing, another rank SIGTERM: this rank saves and exits too
    with pytest.raises(Preempted) as stop:
        handler._maybe_stop(_FakeTrainer())
    assert stop.value.code == 128 + signal.SIGTERM and saved == [1] and not requeued

    # This rank got SLURM's SIGUSR1, another SIGTERM: the requeue signal wins.
    handler._handle(signal.SIGUSR1, None)
    with pytest.raises(Preempted) as stop:
        handler._maybe_stop(_FakeTrainer())
    assert stop.value.code == 128 + signal.SIGUSR1 and requeued == [1]


@pytest.mark.parametrize("rank", [0, 1])
def test_ranks_leave_only_after_rank_zeros_requeue(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """Under `srun --kill-on-bad-exit` the first task to exit with a failure status (138) ends the others: a
    rank that left while rank 0 still ran `scontrol requeue` could lose the requeue. Two ranks, simulated at
    the level of torch.distributed calls on the preemption handler's host group."""
    import torch.distributed as dist

    import resnet_lit.fault_tolerance.preemption as preemption

    events: list[str] = []

    def all_reduce(tensor: torch.Tensor, op: object = None, group: object = None) -> None:
        tensor[0] = max(int(tensor[0]), signal.SIGUSR1 + preemption._REQUEUE_RANK)  # the other rank's signal
        events.append("agree")

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "barrier", lambda group=None: events.append("barrier"))
    monkeypatch.setattr(preemption, "save_last_checkpoint", lambda trainer: events.append("save") or "last.ckpt")
    monkeypatch.setattr(preemption, "requeue_slurm_job", lambda: events.append("requeue") or 0)
    handler = PreemptionHandler()
    handler._requeue_signum, handler._group = signal.SIGUSR1, object()  # SLURM; the gloo group of two ranks
    trainer = _FakeTrainer()
    trainer.is_global_zero = rank == 0
    with pytest.raises(Preempted) as stop:
        handler._maybe_stop(trainer)
    assert stop.value.code == 128 + signal.SIGUSR1
    assert events == (["agree", "save", "requeue", "barrier"] if rank == 0 else ["agree", "save", "barrier"])
