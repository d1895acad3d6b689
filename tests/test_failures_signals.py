"""Signals: Ctrl-C (SIGINT) saves like SIGTERM and a second Ctrl-C stops at once; DataLoader workers ignore
Ctrl-C; SIGTERM and SIGINT stop validate, test and predict after the current batch, saying so, saving nothing.

Signals are real: in-process runs send them to this process from a callback (`SignalAt`); the one subprocess run
sends Ctrl-C to a whole process group, DataLoader workers included, as a terminal does.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from faultinject import QUICKSTART, QUIET, checkpoint_step, cli_command, fault_env, wait_for
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

import resnet_lit.cli as cli
import resnet_lit.fault_tolerance.preemption as preemption
from resnet_lit.cli import main
from resnet_lit.data.loaders import SeededDataLoader
from resnet_lit.fault_tolerance import Preempted, PreemptionHandler
from threads import one_intra_op_thread

FIT = ["fit", "--config", QUICKSTART, *QUIET, "--trainer.max_steps", "8", "--trainer.num_sanity_val_steps", "0",
       "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null"]  # fmt: skip


class SignalAt(Callback):
    """Send `signum` (default SIGINT) to this process `count` times before batch `batch` (the global step in fit)."""

    def __init__(self, signum: int = 2, batch: int = 1, count: int = 1) -> None:
        self.signum, self.batch, self.count = signum, batch, count

    def _send(self, index: int) -> None:
        if index == self.batch:
            for _ in range(self.count):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._send(trainer.global_step)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        if trainer.state.fn == "validate":
            self._send(batch_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        self._send(batch_idx)

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._send(batch_idx)


@pytest.fixture(autouse=True)
def signals_restored() -> Iterator[None]:
    """A stray SIGTERM never kills the test process, and every test leaves the handlers as it found them."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny model: one intra-op thread is as fast, and does not stall when another process holds a core."""
    with one_intra_op_thread():
        yield


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The lines PreemptionHandler logs (on rank 0, to stderr)."""
    lines: list[str] = []
    monkeypatch.setattr(preemption, "rank_zero_info", lines.append)
    return lines


def _exit_code(args: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as stop:
        main(args)
    return stop.value.code


# --- fit -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("count", "saved_step"), [(1, 4), (2, None)], ids=["first-saves", "second-stops-at-once"])
def test_sigint_in_fit_saves_at_the_next_step_and_a_second_one_stops_at_once(
    tmp_path: Path, said: list[str], count: int, saved_step: int | None
) -> None:
    signal_at = ["--trainer.callbacks+=test_failures_signals.SignalAt", "--trainer.callbacks.batch=3",
                 f"--trainer.callbacks.count={count}"]  # fmt: skip
    code = _exit_code([*FIT, "--trainer.default_root_dir", str(tmp_path), *signal_at])
    assert code == 128 + signal.SIGINT
    last = tmp_path / "checkpoints" / "last.ckpt"
    if saved_step is None:  # the second Ctrl-C: no checkpoint, at once
        assert not last.exists() and not said
    else:  # the step during which Ctrl-C came is finished, saved, and named
        assert checkpoint_step(last) == saved_step
        assert any(f"interrupted by SIGINT at epoch 0, step {saved_step}" in line for line in said), said
        assert any("--ckpt_path last" in line for line in said)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning put the handler back


def test_ctrl_c_to_the_process_group_with_dataloader_workers_saves_and_exits_130(tmp_path: Path) -> None:
    """A terminal's Ctrl-C: SIGINT to the process and its DataLoader worker, which must not die of it."""
    command = cli_command("fit", "--config", QUICKSTART, *QUIET, "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "5",
                          "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
                          "--checkpoint.monitor", "null",
                          "--data.init_args.num_workers", "1",
                          "--trainer.callbacks+=faultinject.SlowSteps")  # fmt: skip
    process = subprocess.Popen(command, env=fault_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    last = tmp_path / "checkpoints" / "last.ckpt"
    wait_for(last, process)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    output = out + err
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Traceback" not in output and "exited unexpectedly" not in output, output[-3000:]
    saved = checkpoint_step(last)
    assert saved >= 5 and f"interrupted by SIGINT at epoch {saved // 19}, step {saved}; saved" in output
    assert "press Ctrl-C again to stop at once" in output


class _SigintInWorker(Dataset):
    """Each item sends SIGINT to the worker process that loads it, as a Ctrl-C to the process group does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        info = get_worker_info()
        if info is not None:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor([index, getattr(info.dataset, "seeded_by", -1) if info else -1])


def _seed_worker(worker_id: int) -> None:
    get_worker_info().dataset.seeded_by = worker_id  # type: ignore[union-attr]


def test_dataloader_workers_ignore_sigint_and_still_run_lightnings_worker_init() -> None:
    loader = SeededDataLoader(_SigintInWorker(), batch_size=1, num_workers=1, worker_init_fn=_seed_worker)
    batches = [batch.tolist() for batch in loader]
    assert batches == [[[i, 0]] for i in range(4)]  # every item, from a worker that was seeded


# --- agreement between ranks --------------------------------------------------------------------------------------
def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)


def test_ranks_agree_on_ctrl_c_as_on_sigterm_and_sigterm_outranks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    others: list[int] = []  # what the other ranks contribute to the all-reduce(max)
    monkeypatch.setattr(preemption, "host_max_each", lambda trainer, values, group: [max(values[0], *others), 0])
    monkeypatch.setattr(preemption, "save_last_checkpoint", lambda trainer: "last.ckpt")
    trainer, handler = _trainer(), PreemptionHandler()
    handler.on_train_start(trainer, None)  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGINT) == handler._handle  # else Ctrl-C would interrupt the test session
    os.kill(os.getpid(), signal.SIGINT)  # recorded, acted on at the next safe point
    others[:] = [0]
    with pytest.raises(Preempted) as stop:
        handler._maybe_stop(trainer)
    assert stop.value.code == 128 + signal.SIGINT
    others[:] = [signal.SIGTERM]  # this rank got Ctrl-C, another one SIGTERM: SIGTERM wins
    with pytest.raises(Preempted) as stop:
        handler._maybe_stop(trainer)
    assert stop.value.code == 128 + signal.SIGTERM


def test_evaluation_ranks_agree_only_over_the_batches_that_all_of_them_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def host_max(trainer: Any, value: int, group: Any) -> int:
        calls.append(value)
        return max(value, -2)  # the other rank runs 2 batches

    monkeypatch.setattr(preemption, "host_max", host_max)
    trainer, handler = _trainer(), PreemptionHandler()
    handler.setup(trainer, None, "test")  # type: ignore[arg-type]
    handler._evaluating = True  # a bare Trainer is not testing; the CLI's is
    handler._start_evaluation(trainer, [3])  # this rank runs 3 batches
    for _ in range(2):
        handler.on_test_batch_end(trainer)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        handler.on_test_batch_end(trainer)  # the third batch: this rank's own signal, no collective
    assert stop.value.code == 128 + signal.SIGTERM
    assert calls == [-3, 0, 0]  # the batch counts, then one agreement per common batch


# --- validate, test, predict --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "signum"),
    [("validate", signal.SIGTERM), ("test", signal.SIGTERM), ("predict", signal.SIGTERM), ("test", signal.SIGINT)],
)
def test_signals_stop_evaluation_and_prediction_after_the_batch_say_so_and_save_nothing(
    tmp_path: Path, said: list[str], command: str, signum: int
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        Image.new("L", (8, 8), color=i * 40).save(images / f"{i}.png")
    output = tmp_path / "predictions.csv"
    code = _exit_code([command, "--config", QUICKSTART, *QUIET, "--trainer.default_root_dir", str(tmp_path / "run"),
                       "--data.init_args.eval_batch_size", "1", "--data.init_args.predict_dir", str(images),
                       "--prediction_writer.output_path", str(output),
                       "--trainer.callbacks+=test_failures_signals.SignalAt", f"--trainer.callbacks.signum={signum}",
                       "--trainer.callbacks.batch=1"])  # fmt: skip
    assert code == 128 + signum
    name = signal.Signals(signum).name
    assert said == [f"resnet-lit: {command} stopped by {name} after 2 batches; nothing saved"]
    assert not output.exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [(SIGTERMException, 143, "stopped by SIGTERM"), (KeyboardInterrupt, 130, "stopped by SIGINT")],
    ids=["lightnings-sigterm", "ctrl-c-before-the-trainer-runs"],
)
def test_a_signal_before_resnet_lits_handler_takes_over_exits_128_plus_signal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], raised: type, code: int, line: str
) -> None:
    def interrupted(args: Any) -> None:
        raise raised()

    monkeypatch.setattr(cli, "_run_cli", interrupted)
    try:
        main(["fit", "--config", QUICKSTART])
        stop: BaseException | None = None
    except BaseException as err:  # before the fix, a KeyboardInterrupt would end the test session
        stop = err
    assert isinstance(stop, SystemExit) and stop.code == code
    assert capsys.readouterr().err.strip() == f"resnet-lit: {line}; nothing saved"
