"""`loader: auto`, the default: the device path where it can run the transforms and the decoded splits fit the
memory budget, else the DataLoader path; rank 0 decides for every process, the choice and its reason are logged
once, and a resumed fit keeps the path of its checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from faultinject import Crash, CrashAtStep
from lightning.pytorch.callbacks import ModelCheckpoint

import resnet_lit.data.base as base_module
import resnet_lit.data.loader_choice as loader_choice
from batch_recorder import BatchRecorder
from fakedata import fed, write_fake_cifar10, write_image_folder
from resnet_lit.cli import ResNetLitCLI
from resnet_lit.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, SyntheticDataModule
from resnet_lit.data.device_store import DeviceImageStore
from resnet_lit.data.loader_choice import decoded_size, memory_budgets

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
CPU = torch.device("cpu")


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The DataModule's rank-0 log lines."""
    messages: list[str] = []
    monkeypatch.setattr(base_module, "rank_zero_info", messages.append)
    return messages


def test_the_quickstart_takes_the_device_path_says_why_once_and_saves_it(tmp_path: Path, logged: list[str]) -> None:
    cli = ResNetLitCLI(args=["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path),
                             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                             "--checkpoint.every_n_train_steps", "1", *QUIET])  # fmt: skip
    assert cli.datamodule.loader_kind == "device"
    # 1257 train + 270 val + 270 test digits, 8x8 float32 and an int64 label each: 1797 x 264 bytes
    assert len(logged) == 1, logged
    assert logged[0].startswith("resnet-lit: data.loader auto -> device (the decoded splits (1797 images of "
                                "1x8x8 float32, 474 kB) fit the in-memory budget of ")  # fmt: skip
    assert "0.25 of the " in logged[0] and "of available host memory" in logged[0]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["DigitsDataModule"]["loader"] == "device"


def test_a_dataset_over_the_budget_takes_the_dataloader_path_and_says_why(logged: list[str]) -> None:
    def make(**budget: float) -> SyntheticDataModule:
        return SyntheticDataModule(num_samples=64, num_val_samples=16, num_test_samples=0, image_size=8,
                                   batch_size=8, **budget)  # fmt: skip

    assert make().loader_kind == "device"
    tiny = make(device_memory_fraction=1e-9)
    assert tiny.loader_kind == "dataloader"
    assert re.fullmatch(
        r"resnet-lit: data\.loader auto -> dataloader \(the decoded splits \(80 images of 3x8x8 float32, 62\.1 kB\) "
        r"exceed the in-memory budget of \d+ B: 1e-09 of the [\d.]+ [kMGT]?B of available host memory; "
        r"a larger data\.device_memory_fraction allows more\)",
        logged[-1],
    ), logged[-1]
    x, y = fed(tiny, tiny.train_dataloader())[0]  # DataLoader batches, finished as usual
    assert x.shape == (8, 3, 8, 8) and y.shape == (8,)


def test_transforms_the_device_path_cannot_run_take_the_dataloader_path(tmp_path: Path, logged: list[str]) -> None:
    write_image_folder(tmp_path, classes=("a", "b"), per_class=2, size=36, splits=("train", "val"))
    assert ImageFolderDataModule(root=str(tmp_path), image_size=32).loader_kind == "dataloader"
    assert logged[-1].startswith("resnet-lit: data.loader auto -> dataloader (") and "'imagenet'" in logged[-1]
    cifar_style = ImageFolderDataModule(root=str(tmp_path), transform_style="cifar", image_size=32)
    assert cifar_style.loader_kind == "device"
    # 4 train images padded to 40x40 for the random crop, 4 val images at 32x32 (from 36x36 JPEGs)
    assert "(8 images of 3x32x32 uint8, 31.6 kB)" in logged[-1]


def test_the_estimate_is_what_the_store_holds_with_cifars_val_and_test_counted_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=6, num_test=10)  # 30 train; the 10 test images validate
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    size = decoded_size(dm.splits(), dm.pipeline)
    assert (size.images, size.nbytes) == (40, 30 * (3 * 40 * 40 + 8) + 10 * (3 * 32 * 32 + 8))
    store = DeviceImageStore.from_splits(dm.splits(), dm.pipeline)
    held = {id(t.images): t for t in (store.split(name, CPU) for name in store.split_names)}
    assert len(store.split_names) == 3 and len(held) == 2  # val and test are one tensor
    assert size.nbytes == sum(t.images.nbytes + t.targets.nbytes for t in held.values())


def test_the_budget_on_a_gpu_is_a_share_of_its_free_memory_and_of_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 10**9, 80 * 10**9))
    monkeypatch.setattr(loader_choice, "available_host_memory", lambda: 64 * 10**9)
    gpu, host = memory_budgets(torch.device("cuda", 1), 0.25, processes_per_host=8)
    assert (gpu.nbytes, host.nbytes) == (2 * 10**9, 2 * 10**9)
    assert gpu.source == "0.25 of the 8 GB free on cuda:1"
    assert host.source == "0.25 of the 64 GB of available host memory / 8 processes"


# --- resume: the checkpoint's path, whatever the budget says now ------------------------------------------------





def _fit(dm: CIFAR10DataModule, root: Path, crash_at: int | None = None, ckpt_path: str | None = None) -> BatchRecorder:
    model = BatchRecorder(3 * 32 * 32)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        use_distributed_sampler=False,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(root, save_last=True, every_n_train_steps=1),
                   *([CrashAtStep(crash_at)] if crash_at is not None else [])],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    with contextlib.suppress(Crash):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_a_resumed_fit_keeps_the_path_of_its_checkpoint_and_its_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: list[str]
) -> None:
    """The device path crops and flips by other random draws than the DataLoader's transforms: a resume that
    changed paths would train on other images than the uninterrupted run."""
    write_fake_cifar10(tmp_path / "data", monkeypatch, per_batch=13, num_test=4)  # 65 images: 8 steps per epoch

    def make(fraction: float) -> CIFAR10DataModule:
        return CIFAR10DataModule(data_dir=str(tmp_path / "data"), batch_size=8, seed=3, device_memory_fraction=fraction)

    uninterrupted = _fit(make(0.25), tmp_path / "full")
    folder = tmp_path / "run"
    _fit(make(0.25), folder, crash_at=11)
    assert torch.load(folder / "last.ckpt", weights_only=True)["CIFAR10DataModule"]["loader"] == "device"
    logged.clear()
    resumed_dm = make(1e-9)  # this budget alone takes the DataLoader path
    resumed = _fit(resumed_dm, folder, ckpt_path=str(folder / "last.ckpt"))
    assert resumed_dm.loader_kind == "device"
    assert len(logged) == 1 and logged[0].startswith(
        "resnet-lit: data.loader auto -> device (kept from the checkpoint: a resumed fit stays on its path; "
        "the budget now would choose dataloader: the decoded splits"
    ), logged
    assert sorted(resumed.seen) == list(range(11, 16))
    for step, (x, y) in resumed.seen.items():
        assert torch.equal(x, uninterrupted.seen[step][0]) and torch.equal(y, uninterrupted.seen[step][1]), step


def test_the_checkpoints_path_counts_for_a_fit_with_auto_only() -> None:
    state = {"seed": 0, "batch_size": 8, "world_size": 1, "loader": "dataloader"}
    auto = SyntheticDataModule(num_samples=16, image_size=4)
    auto.load_state_dict(state)
    assert auto.loader_kind == "dataloader"  # kept, though the data would fit
    explicit = SyntheticDataModule(num_samples=16, image_size=4, loader="device")
    explicit.load_state_dict(state)
    assert explicit.loader_kind == "device"  # data.loader set: the config wins
    fresh = SyntheticDataModule(num_samples=16, image_size=4)
    assert fresh.loader_kind == "device" and fresh.state_dict()["loader"] == "device"


# --- several processes: rank 0 decides ---------------------------------------------------------------------------


class RankBudgetDigits(DigitsDataModule):
    """Digits whose rank 1 has a budget too small for the device path, as a process with less free memory would;
    each rank writes the path it trains on to ``$LOADER_AUTO_RECORD/rank<R>.txt``."""

    def setup(self, stage: str | None = None) -> None:
        if self.trainer.global_rank == 1:
            self.device_memory_fraction = 1e-9
        super().setup(stage)

    def train_dataloader(self) -> Any:
        loader = super().train_dataloader()
        record = Path(os.environ["LOADER_AUTO_RECORD"], f"rank{self.trainer.global_rank}.txt")
        record.write_text(self.loader_kind)
        return loader


@pytest.mark.slow
def test_every_process_follows_rank_zero(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):  # fmt: skip
        env.pop(key, None)
    env.update({
        "OMP_NUM_THREADS": "1",
        "LOADER_AUTO_RECORD": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]),
    })  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lit", "fit", "--config", QUICKSTART,
         "--data.class_path", "test_loader_auto.RankBudgetDigits", "--data.init_args.batch_size", "32",
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
         "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (tmp_path / "rank0.txt").read_text() == (tmp_path / "rank1.txt").read_text() == "device"
    assert log.count("data.loader auto -> ") == 1, log[-4000:]
    assert "data.loader auto -> device (the decoded splits" in log
    assert "/ 2 processes" in log  # the host's memory is shared by its processes
