"""`model.lr_reference_batch`: lr x devices x num_nodes x batch_size x accumulate_grad_batches / reference.

The recipe states the lr per `lr_reference_batch` images of global batch; the module scales it when the optimizer
is built, before the scheduler captures it, logs the factor, and resuming restores the already-scaled lr from the
checkpoint instead of scaling again.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer

from lr_recorder import recorded_lrs
from resnet_lit.cli import main
from resnet_lit.errors import ResNetLitError
from resnet_lit.module import ResNetClassifier, global_batch_size
from resnet_lit.optim import WarmupCosineLR
from threads import one_intra_op_thread

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fake_trainer(world_size: int, batch_size: int, accumulate: int) -> SimpleNamespace:
    """What `configure_optimizers` reads from a Trainer attached to a DataModule."""
    return SimpleNamespace(
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        datamodule=SimpleNamespace(batch_size=batch_size),
        estimated_stepping_batches=100,
        max_epochs=10,
        max_steps=-1,
    )


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)


@pytest.fixture
def info(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    messages: list[str] = []
    monkeypatch.setattr("resnet_lit.module.rank_zero_info", messages.append)
    return messages


def test_trainer_world_size_is_devices_times_num_nodes() -> None:
    trainer = Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", accumulate_grad_batches=3,
                      logger=False, enable_checkpointing=False)  # fmt: skip
    trainer.strategy.set_world_ranks()  # what DDP does at setup, before configure_optimizers
    assert trainer.world_size == 8
    trainer_view = SimpleNamespace(world_size=trainer.world_size, datamodule=SimpleNamespace(batch_size=32),
                                   accumulate_grad_batches=trainer.accumulate_grad_batches)  # fmt: skip
    assert global_batch_size(trainer_view) == 8 * 32 * 3


@pytest.mark.parametrize(
    ("world_size", "batch_size", "accumulate", "factor"),
    [(1, 256, 1, 1.0), (8, 32, 1, 1.0), (16, 64, 1, 4.0), (4, 32, 2, 1.0), (1, 64, 1, 0.25), (2, 128, 4, 4.0)],
)
def test_every_param_group_is_scaled_by_the_global_batch(
    world_size: int, batch_size: int, accumulate: int, factor: float, info: list[str]
) -> None:
    module = ResNetClassifier(arch="resnet20", optimizer=sgd(0.1), lr_reference_batch=256,
                              no_weight_decay_on_norm_and_bias=True)  # fmt: skip
    module.trainer = fake_trainer(world_size, batch_size, accumulate)
    optimizer = module.configure_optimizers()
    assert len(optimizer.param_groups) == 2  # decayed and exempt parameters
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor] * 2)
    global_batch = world_size * batch_size * accumulate
    assert len(info) == 1
    assert f"global batch {global_batch} / 256 = {factor:g}" in info[0]
    assert "model.lr_reference_batch: null" in info[0]  # says how to turn it off


def test_no_reference_batch_leaves_the_lr_alone(info: list[str]) -> None:
    module = ResNetClassifier(arch="resnet20", optimizer=sgd(0.1), lr_reference_batch=None)
    module.trainer = fake_trainer(world_size=8, batch_size=128, accumulate=2)
    optimizer = module.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [0.1]
    assert info == []


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "multistep"])
def test_the_scheduler_is_built_on_the_scaled_lr(scheduler: str, info: list[str]) -> None:
    def make_scheduler(optimizer: torch.optim.Optimizer):
        if scheduler == "warmup_cosine":
            return WarmupCosineLR(optimizer, warmup_steps=10, warmup_start_factor=0.1)
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5], gamma=0.1)

    module = ResNetClassifier(arch="resnet20", optimizer=sgd(0.1), lr_scheduler=make_scheduler, lr_reference_batch=256)
    module.trainer = fake_trainer(world_size=4, batch_size=128, accumulate=1)  # factor 2
    config = module.configure_optimizers()
    optimizer, scheduler_obj = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert scheduler_obj.base_lrs == pytest.approx([0.2])
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.2)
    expected_first = 0.2 * 0.1 if scheduler == "warmup_cosine" else 0.2  # warmup starts at 10% of the scaled peak
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_first)
    for _ in range(10):
        optimizer.step()
        scheduler_obj.step()
    expected_later = 0.2 if scheduler == "warmup_cosine" else 0.02  # warmup peak / after the milestone
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_later)


def _lrs(checkpoint_path: Path) -> tuple[list[float], list[float]]:
    checkpoint = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
    initial = [g["initial_lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]]
    return initial, checkpoint["lr_schedulers"][0]["base_lrs"]


@pytest.fixture
def one_thread():
    """Tiny model: one intra-op thread is as fast, and does not stall when another process holds a core."""
    with one_intra_op_thread():
        yield


@pytest.mark.usefixtures("one_thread")
def test_resume_restores_the_scaled_lr_instead_of_scaling_twice(tmp_path: Path, info: list[str]) -> None:
    args = ["fit", "--config", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), *QUIET,
            "--trainer.limit_val_batches", "0", "--data.init_args.batch_size", "16",
            "--trainer.accumulate_grad_batches", "2", "--model.lr_reference_batch", "256"]  # fmt: skip
    expected = 0.1 * 16 * 2 / 256  # quickstart lr 0.1, global batch 1 x 16 x 2
    main([*args, "--trainer.max_steps", "2"])
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 2
    assert _lrs(tmp_path / "checkpoints" / "last.ckpt") == (pytest.approx([expected] * 2),
                                                             pytest.approx([expected] * 2))  # fmt: skip

    main([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert _lrs(tmp_path / "checkpoints" / "last.ckpt") == (pytest.approx([expected] * 2),
                                                             pytest.approx([expected] * 2))  # fmt: skip
    assert len(info) == 2 and all("= 0.125" in message for message in info)  # logged at each start


def test_a_fractional_warmup_runs_the_first_step_at_the_start_factor(info: list[str]) -> None:
    """quickstart.yaml and cifar10_resnet18.yaml: `warmup_steps: 0.05`, a fraction of the run length."""
    module = ResNetClassifier(
        arch="resnet20", optimizer=sgd(0.1), lr_scheduler=lambda opt: WarmupCosineLR(opt, warmup_steps=0.05)
    )
    module.trainer = fake_trainer(world_size=1, batch_size=64, accumulate=1)  # a run of 100 steps: warmup 5
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    used = []
    for _ in range(6):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([0.1 * (0.01 + 0.99 * step / 5) for step in range(5)] + [0.1])
    assert scheduler.get_last_lr() == pytest.approx([0.1 * math.cos(math.pi * 1 / 95) / 2 + 0.05])


def _epoch_scheduled(max_epochs: int, max_steps: int) -> WarmupCosineLR:
    module = ResNetClassifier(arch="resnet20", optimizer=sgd(0.1), lr_scheduler=WarmupCosineLR,
                              scheduler_interval="epoch")  # fmt: skip
    module.trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, train_dataloader=object(),
                                     num_training_batches=19, accumulate_grad_batches=2,
                                     estimated_stepping_batches=50)  # fmt: skip
    return module.configure_optimizers()["lr_scheduler"]["scheduler"]


def test_an_epoch_schedule_without_max_epochs_takes_its_length_from_max_steps() -> None:
    assert _epoch_scheduled(max_epochs=-1, max_steps=50).total_steps == 5  # epochs of ceil(19 / 2) = 10 steps
    assert _epoch_scheduled(max_epochs=3, max_steps=50).total_steps == 3  # the shorter of both
    assert _epoch_scheduled(max_epochs=8, max_steps=-1).total_steps == 8
    with pytest.raises(ResNetLitError, match=r"trainer.max_epochs \(-1\) and trainer.max_steps \(-1\)"):
        _epoch_scheduled(max_epochs=-1, max_steps=-1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("reference", [None, 256], ids=["unscaled", "lr_reference_batch"])
def test_resume_with_a_lower_lr_continues_the_schedule_at_that_lr(
    tmp_path: Path, info: list[str], reference: int | None
) -> None:
    """What the non-finite loss message suggests: `--ckpt_path last --model.optimizer.init_args.lr <lower lr>`."""
    args = ["fit", "--config", QUICKSTART, *QUIET, "--trainer.limit_val_batches", "0", "--trainer.max_steps", "6",
            "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "3", "--checkpoint.save_top_k", "-1",
            "--model.lr_scheduler.init_args.warmup_steps", "0.5", "--data.init_args.batch_size", "32"]  # fmt: skip
    if reference:
        args += ["--model.lr_reference_batch", str(reference)]
    peak = 0.1 * (32 / reference if reference else 1)
    uninterrupted = recorded_lrs([*args, "--trainer.default_root_dir", str(tmp_path / "a")])
    assert max(lr for lrs in uninterrupted.values() for lr in lrs) == pytest.approx(peak)

    resumed_dir = tmp_path / "b" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "epoch000-step3.ckpt", resumed_dir / "last.ckpt")
    info.clear()
    run = [*args, "--trainer.default_root_dir", str(tmp_path / "b"), "--ckpt_path", "last"]
    resumed = recorded_lrs([*run, "--model.optimizer.init_args.lr", "0.05"])
    assert sorted(resumed) == [3, 4, 5]
    for step, lrs in resumed.items():
        assert lrs == pytest.approx([lr / 2 for lr in uninterrupted[step]], rel=1e-12)
    said = [line for line in info if "differs from the checkpoint's" in line]
    assert len(said) == 1 and "scaled by 0.5" in said[0], info

    if reference is None:  # an unchanged config resumes bit for bit, with nothing said
        shutil.copy(tmp_path / "a" / "checkpoints" / "epoch000-step3.ckpt", resumed_dir / "last.ckpt")
        info.clear()
        unchanged = recorded_lrs(run)
        assert unchanged == {step: uninterrupted[step] for step in (3, 4, 5)}
        assert not info
