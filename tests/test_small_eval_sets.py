"""Evaluation and predict sets too small for the processes: every process needs a batch, or the ranks would wait
for each other at the next collective. Such runs stop before any batch with one error line naming the split and
the sizes, the same on every rank (issue 11)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnet_lit.cli import main
from resnet_lit.data import DataConfigError, SyntheticDataModule

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def _trainer(rank: int, world_size: int = 2, **limits: float | int) -> types.SimpleNamespace:
    """What the DataModule reads of a Trainer on process ``rank``."""
    defaults = {"limit_val_batches": 1.0, "limit_test_batches": 1.0, "limit_predict_batches": 1.0}
    # The collective of `loader: auto`: rank 0's choice for every process (here, rank 1 is told "dataloader").
    rank0_choice = ("dataloader", "rank 0's choice in this test")
    strategy = types.SimpleNamespace(broadcast=lambda obj, src=0: rank0_choice if obj is None else obj,
                                     root_device=torch.device("cpu"))  # fmt: skip
    return types.SimpleNamespace(world_size=world_size, global_rank=rank, strategy=strategy, num_devices=1,
                                 **{**defaults, **limits})  # fmt: skip


def _setup_errors(make, stage: str, **limits: float | int) -> list[str]:
    """The error of ``setup(stage)`` on each of 2 processes ("" where it passes)."""
    messages = []
    for rank in (0, 1):
        dm = make()
        dm.trainer = _trainer(rank, **limits)
        try:
            dm.setup(stage)
            messages.append("")
        except DataConfigError as error:
            messages.append(str(error))
    return messages


@pytest.mark.parametrize(("stage", "split"), [("fit", "val"), ("validate", "val"), ("test", "test")])
def test_a_split_smaller_than_the_processes_is_the_same_error_on_every_rank(stage: str, split: str) -> None:
    def make() -> SyntheticDataModule:
        return SyntheticDataModule(image_size=4, num_samples=8, num_val_samples=1, num_test_samples=1)

    errors = _setup_errors(make, stage)
    assert errors[0] == errors[1] != ""  # also the rank whose shard has the one sample stops
    assert errors[0].startswith(f"the {split} split has 1 sample(s) for 2 processes")


def test_a_predict_folder_with_fewer_images_than_processes_is_an_error(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "only.png")
    errors = _setup_errors(lambda: SyntheticDataModule(image_size=4, num_samples=8, predict_dir=str(tmp_path)),
                           "predict")  # fmt: skip
    expected = (
        f"predict_dir {str(tmp_path)!r} has 1 image(s) for 2 processes, and each process needs at least one: add "
        "images or run on at most 1 process(es) (trainer.devices x trainer.num_nodes)"
    )
    assert errors == [expected, expected]


def test_a_limit_fraction_that_leaves_a_process_no_batch_is_an_error() -> None:
    # 359 samples in batches of 179 on 2 processes: 179 and 180 samples, 1 and 2 batches. Lightning would run
    # int(0.5 x 1) = 0 batches on the first process (which raises there) and 1 on the second (which waits).
    from resnet_lit.data.eval_shards import batches_per_process

    assert batches_per_process(359, 2, 179) == [1, 2]

    def make() -> SyntheticDataModule:
        return SyntheticDataModule(image_size=4, num_samples=8, num_val_samples=359, eval_batch_size=179)

    errors = _setup_errors(make, "fit", limit_val_batches=0.5)
    expected = (
        "trainer.limit_val_batches=0.5 leaves a process without a batch of the val split: 0.5 x 1 batch(es) rounds "
        "to 0 (359 samples over 2 process(es) in batches of 179); set trainer.limit_val_batches to at least 1, or "
        "to a whole number of batches"
    )
    assert errors == [expected, expected]
    for limits in ({"limit_val_batches": 1.0}, {"limit_val_batches": 1}, {"limit_val_batches": 0},
                   {"limit_val_batches": 0.0}, {"limit_test_batches": 0.1}):  # fmt: skip
        assert _setup_errors(make, "fit", **limits) == ["", ""], limits


def test_sizes_that_give_every_process_a_batch_pass() -> None:
    from resnet_lit.data.eval_shards import check_eval_shards

    for size, world_size, batch_size in [(2, 2, 1), (2, 2, 64), (3, 2, 1), (359, 2, 179), (5, 4, 2), (0, 2, 4)]:
        check_eval_shards("the val split", size, world_size, batch_size, "limit_val_batches")
    check_eval_shards("the val split", 1, 2, 1, "limit_val_batches", 0)  # validation switched off


def test_a_rounding_limit_on_one_process_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """On one process Lightning raises its own exception with a traceback; resnet-lit names the key instead."""
    pytest.importorskip("sklearn")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, "--trainer.limit_val_batches", "0.1", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path), *QUIET])  # fmt: skip
    message = str(stop.value.code)
    assert message.startswith("resnet-lit: error: trainer.limit_val_batches=0.1 leaves a process without a batch")
    assert "Traceback" not in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_processes_and_one_val_sample_stop_at_once_with_one_line(tmp_path: Path) -> None:
    """The acceptance run: `fit` on 2 real gloo processes with a 1-sample val split ends within seconds with the
    one-line error (printed by each process), not Lightning's traceback or a hang (the timeout would catch one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCHER_VARS}
    env.update(MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lit", "fit", "--config", QUICKSTART,
         "--data", "resnet_lit.data.SyntheticDataModule", "--data.init_args.image_size", "8",
         "--data.init_args.num_samples", "32", "--data.init_args.num_val_samples", "1",
         "--data.init_args.batch_size", "8", "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(tmp_path), *QUIET],
        capture_output=True, text=True, timeout=150, env=env, cwd=REPO,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    errors = {line for line in log.splitlines() if "resnet-lit: error:" in line}
    assert errors == {
        "resnet-lit: error: the val split has 1 sample(s) for 2 processes, and each process needs at least one: add "
        "samples or run on at most 1 process(es) (trainer.devices x trainer.num_nodes)"
    }, log[-3000:]
