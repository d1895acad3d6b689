"""Checkpoint files: atomic writes under a real kill, weights-only loading from the command line, readable
architecture mismatches, and fine-tuning with a re-initialised head."""

from __future__ import annotations

import csv
import inspect
import logging
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faultinject import QUICKSTART, QUIET, checkpoint_step
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from resnet_lit import ResNetClassifier
from resnet_lit.cli import main
from resnet_lit.fault_tolerance import ResumableCheckpoint, ResumableCSVLogger
from resnet_lit.fault_tolerance.checkpoint_io import AtomicCheckpointIO, CheckpointMismatchError, atomic_torch_save
from resnet_lit.models import NetworkConfig

TINY_FIT = ["fit", "--config", QUICKSTART, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", *QUIET]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of 2 quickstart steps (ResNet-20, 1 channel, 10 classes)."""
    root = tmp_path_factory.mktemp("digits")
    main([*TINY_FIT, "--trainer.default_root_dir", str(root)])
    return root / "checkpoints" / "last.ckpt"


# --- atomic writes ------------------------------------------------------------------------------------------
def test_kill_during_a_checkpoint_write_leaves_the_previous_file_loadable(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(3)}, target)
    # A process that is SIGKILLed in the middle of writing the next checkpoint (after the bytes, before the
    # rename): os.fsync is where it dies.
    script = (
        "import os, signal, torch\n"
        "from resnet_lit.fault_tolerance.checkpoint_io import atomic_torch_save\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_torch_save({{'global_step': 2, 'w': torch.zeros(1 << 20)}}, {str(target)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9
    leftovers = [p.name for p in tmp_path.glob(".last.ckpt.*.partial")]
    assert len(leftovers) == 1, leftovers  # the half-done write went to a temp file of its own ...
    assert torch.load(target, weights_only=True)["global_step"] == 1  # ... so last.ckpt is the previous one
    atomic_torch_save({"global_step": 3}, target)  # the next save removes the dead writer's leftover
    assert torch.load(target, weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_writes_next_to_the_target_and_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renames.append((src, dst)) or real_replace(src, dst))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    assert [(Path(src).parent, Path(dst)) for src, dst in renames] == [(target.parent, target)]
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(target)["state_dict"]["w"], torch.ones(2))


# --- weights-only loading from the command line -------------------------------------------------------------
class _Payload:
    """Unpickling this runs `Path.touch(marker)`: the arbitrary code a malicious checkpoint could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("ckpt", ["file", "last"])
def test_checkpoints_from_the_command_line_are_never_unpickled(
    tmp_path: Path, digits_checkpoint: Path, ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    evil = torch.load(digits_checkpoint, weights_only=True)
    evil["payload"] = _Payload(marker)
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(evil, path)
    stage = "validate" if ckpt == "file" else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--config", QUICKSTART, "--ckpt_path", str(path) if ckpt == "file" else "last",
              "--trainer.default_root_dir", str(run_dir), *QUIET])  # fmt: skip
    assert exit_info.value.code not in (0, None)
    assert not marker.exists()
    assert "refusing to load a checkpoint that needs arbitrary unpickling" in str(exit_info.value.code)


# --- architecture mismatch, fine-tuning ------------------------------------------------------------------------
def test_resuming_into_another_architecture_lists_keys_and_shapes(
    tmp_path: Path, digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = digits_checkpoint.parent.parent
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_FIT, "--trainer.max_steps", "4", "--trainer.default_root_dir", str(run_dir),
              "--ckpt_path", "last", "--model.arch", "resnet32", "--model.net.widths", "[16, 32, 128]"])  # fmt: skip
    message = str(exit_info.value.code)
    assert message.startswith("resnet-lit: error: the checkpoint does not fit this model's architecture")
    assert "31 shape mismatch(es)" in message
    assert "net.stages.2.0.conv1.weight: [64, 32, 3, 3] -> [128, 32, 3, 3]" in message
    assert "72 key(s) of the model missing from the checkpoint: net.stages.0.3.bn1.bias" in message
    assert "checkpoint: arch='resnet20'" in message and "model:      arch='resnet32'" in message
    assert checkpoint_step(digits_checkpoint) == 2  # untouched


def _fine_tune_model(ckpt: Path, reinit_head: bool) -> ResNetClassifier:
    return ResNetClassifier(arch="resnet20", net=NetworkConfig(strides=[1, 2, 2]), num_classes=4, in_channels=1,
                            init_from=str(ckpt), reinit_head=reinit_head)  # fmt: skip


def test_fine_tuning_with_other_classes_needs_reinit_head_and_says_so(
    digits_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        _fine_tune_model(digits_checkpoint, reinit_head=False)
    assert "head.fc.weight: [10, 64] -> [4, 64]" in str(info.value)
    assert "set model.reinit_head: true" in str(info.value)

    with caplog.at_level(logging.INFO):
        model = _fine_tune_model(digits_checkpoint, reinit_head=True)
    assert "re-initialised the classification head because model.reinit_head is true" in caplog.text
    assert "head.fc.weight [10, 64] -> [4, 64]" in caplog.text
    saved = torch.load(digits_checkpoint, weights_only=True)["state_dict"]
    ours = model.state_dict()
    assert torch.equal(ours["net.stem.conv.weight"], saved["net.stem.conv.weight"])
    assert ours["net.head.fc.weight"].shape == (4, 64)
    assert "init_from" not in model.hparams  # a later load_from_checkpoint does not need the file


def test_fine_tuning_through_the_cli(
    tmp_path: Path, digits_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    synthetic = ["--data", "resnet_lit.data.SyntheticDataModule", "--data.num_classes", "4",
                 "--data.in_channels", "1", "--data.image_size", "8", "--data.num_samples", "64",
                 "--data.batch_size", "16"]  # fmt: skip
    args = ["fit", "--config", QUICKSTART, *synthetic, "--trainer.fast_dev_run", "true",
            "--trainer.default_root_dir", str(tmp_path), "--model.init_from", str(digits_checkpoint),
            *QUIET]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert "model.reinit_head: true" in str(exit_info.value.code)
    main([*args, "--model.reinit_head", "true"])


# --- the Lightning members that the fault-tolerance classes extend ------------------------------------------
def test_modelcheckpoint_members_that_resumable_checkpoint_extends_are_there() -> None:
    """ResumableCheckpoint decides when to save and leaves the writing to ModelCheckpoint's protected savers and
    triggers. A Lightning upgrade that renames or reshapes one of them fails here first."""
    savers = ("_save_topk_checkpoint", "_save_last_checkpoint")
    for name in savers:
        assert list(inspect.signature(getattr(ModelCheckpoint, name)).parameters) == [
            "self", "trainer", "monitor_candidates"]  # fmt: skip
    for name in ("_should_skip_saving_checkpoint", "_should_save_on_train_epoch_end"):
        assert list(inspect.signature(getattr(ModelCheckpoint, name)).parameters) == ["self", "trainer"]
    callback = ResumableCheckpoint(every_n_train_steps=5)
    assert callback._last_global_step_saved == 0
    # Epoch-end top-k saves stay on with an interval, and checkpoints file the callback's state under that setting.
    assert callback._every_n_epochs == callback.every_n_epochs == 1
    assert "'every_n_epochs': 1" in callback.state_key


def test_csv_logger_with_append_continues_metrics_csv(tmp_path: Path) -> None:
    """ResumableCSVLogger overrides the protected hook in which Lightning's writer deletes an existing file."""
    assert callable(ExperimentWriter._check_log_dir_exists)
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,0,2.5\n")
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="", append=True)
    logger.log_metrics({"train/loss": 2.0, "val/acc": 0.5}, step=1)
    logger.save()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["step"], row["train/loss"], row["val/acc"]) for row in rows] == [("0", "2.5", ""), ("1", "2.0", "0.5")]
