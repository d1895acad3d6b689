"""Train loaders resume through Lightning's stateful-dataloader protocol (and the DataModule's copy of their position
where Lightning misses it): a fit interrupted anywhere and resumed from its checkpoint trains on exactly the batches
the uninterrupted fit had left, on both loader back-ends."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from batch_recorder import BatchRecorder
from fakedata import write_fake_cifar10
from resnet_lit.data import CIFAR10DataModule, ImageDataModule, SyntheticDataModule
from resnet_lit.data.backends import DataLoaderBackend, DeviceBackend, LoaderSettings, Placement
from resnet_lit.data.loaders import IndexBatch
from resnet_lit.data.transforms import ImagePipeline

STEPS_PER_EPOCH = 8
UNRESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended"



class _Crash(RuntimeError):
    pass


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise _Crash


def _synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    return SyntheticDataModule(image_size=8, num_samples=64, num_val_samples=0, batch_size=8, augment="trivialaugment")


def _cifar_on_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=13, num_test=4)  # 65 images: 8 batches, one dropped item
    return CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, seed=3, loader="device", random_erasing=0.5)


def _cifar_uint8_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    """The DataLoader path of a uint8 dataset: crop and flip in the workers, random erasing after the transfer."""
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=13, num_test=4)
    return CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, seed=3, random_erasing=0.5)


DATAMODULES = {"dataloader-trivialaugment": _synthetic, "device-cifar-crop-flip-erasing": _cifar_on_device}


def _fit(
    dm: ImageDataModule,
    root: Path,
    checkpoint: dict[str, Any],
    crash_at: int | None = None,
    ckpt_path: str | None = None,
    estimate_steps: bool = True,
) -> BatchRecorder:
    crash = [_CrashAt(crash_at)] if crash_at is not None else []
    model = BatchRecorder(3 * (dm.pipeline.crop_size or 8) ** 2, estimate_steps)  # synthetic images are 8x8
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        use_distributed_sampler=False,
        limit_val_batches=0,
        callbacks=[ModelCheckpoint(root, save_last=True, **checkpoint), *crash],
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with contextlib.suppress(_Crash):
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


EVERY_STEP = {"every_n_train_steps": 1}  # ModelCheckpoint arguments: saves in on_train_batch_end
EPOCH_END = {"save_on_train_epoch_end": True}  # saves in on_train_epoch_end only


@pytest.mark.parametrize("make", DATAMODULES.values(), ids=DATAMODULES.keys())
@pytest.mark.parametrize(
    ("checkpoint", "crash_at", "resume_at"),
    [(EVERY_STEP, 11, 11), (EVERY_STEP, 8, 8), (EVERY_STEP, 7, 7), (EPOCH_END, 11, 8)],
    ids=["mid-epoch", "after-the-last-batch", "before-the-last-batch", "epoch-end-checkpoint"],
)
def test_a_resumed_fit_trains_on_the_uninterrupted_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable, checkpoint: dict[str, Any],
    crash_at: int, resume_at: int,
) -> None:  # fmt: skip
    uninterrupted = _fit(make(tmp_path / "data", monkeypatch), tmp_path / "full", checkpoint)
    assert len(uninterrupted.seen) == 3 * STEPS_PER_EPOCH

    folder = tmp_path / "run"
    _fit(make(tmp_path / "data", monkeypatch), folder, checkpoint, crash_at=crash_at)
    last = folder / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == resume_at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(make(tmp_path / "data", monkeypatch), folder, checkpoint, ckpt_path=str(last))
    assert not [w for w in caught if UNRESUMABLE in str(w.message)]  # Lightning sees a resumable loader

    assert sorted(resumed.seen) == list(range(resume_at, 3 * STEPS_PER_EPOCH))
    for step, (x, y) in resumed.seen.items():
        assert torch.equal(x, uninterrupted.seen[step][0]) and torch.equal(y, uninterrupted.seen[step][1]), step


def test_a_resumed_fit_on_uint8_batches_erased_on_the_device_trains_on_the_uninterrupted_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random erasing after the transfer draws from the sample seeds only: a resume mid-epoch sees the same pixels."""
    uninterrupted = _fit(_cifar_uint8_loader(tmp_path / "data", monkeypatch), tmp_path / "full", EVERY_STEP)
    assert any((x == 0).flatten(1).sum(1).gt(16).any() for x, _ in uninterrupted.seen.values())  # erased rectangles
    folder = tmp_path / "run"
    _fit(_cifar_uint8_loader(tmp_path / "data", monkeypatch), folder, EVERY_STEP, crash_at=11)
    resumed = _fit(_cifar_uint8_loader(tmp_path / "data", monkeypatch), folder, EVERY_STEP,
                   ckpt_path=str(folder / "last.ckpt"))  # fmt: skip
    assert sorted(resumed.seen) == list(range(11, 3 * STEPS_PER_EPOCH))
    for step, (x, y) in resumed.seen.items():
        assert torch.equal(x, uninterrupted.seen[step][0]) and torch.equal(y, uninterrupted.seen[step][1]), step


@pytest.mark.parametrize("estimate_steps", [False, True], ids=["lightning-restores", "lightning-issue-20550"])
def test_lightning_alone_restores_the_train_loader_unless_steps_were_estimated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, estimate_steps: bool
) -> None:
    """Pins why the DataModule keeps a copy of the train position: with its copy ignored, Lightning restores the
    stateful loader itself, except after ``estimated_stepping_batches``. When this fails for that case, Lightning
    has fixed its issue #20550 and the copy in ImageDataModule.state_dict can go."""
    uninterrupted = _fit(
        _synthetic(tmp_path, monkeypatch), tmp_path / "full", EVERY_STEP, estimate_steps=estimate_steps
    )
    folder = tmp_path / "run"
    _fit(_synthetic(tmp_path, monkeypatch), folder, EVERY_STEP, crash_at=11, estimate_steps=estimate_steps)
    load_seed_only = ImageDataModule.load_state_dict
    monkeypatch.setattr(
        ImageDataModule, "load_state_dict", lambda dm, state: load_seed_only(dm, {"seed": state["seed"]})
    )
    resumed = _fit(_synthetic(tmp_path, monkeypatch), folder, EVERY_STEP, ckpt_path=str(folder / "last.ckpt"),
                   estimate_steps=estimate_steps)  # fmt: skip
    restored = all(torch.equal(x, uninterrupted.seen[step][0]) for step, (x, _) in resumed.seen.items())
    if estimate_steps:
        assert not restored, "Lightning restores the loader after estimated_stepping_batches now: drop the copy"
    else:
        assert restored, "Lightning no longer restores a stateful train loader"


@pytest.mark.parametrize("backend", [DataLoaderBackend, DeviceBackend])
def test_rank_zero_state_resumes_every_rank(backend: type) -> None:
    """Only rank 0 writes the checkpoint: its loader state must resume the other ranks at their own position."""
    dm = SyntheticDataModule(num_samples=37, batch_size=4, seed=2)
    settings, splits = LoaderSettings(batch_size=4, eval_batch_size=4, drop_last=False), dm.splits()
    pipeline = ImagePipeline("plain", None, None, (0.5,) * 3, (0.25,) * 3)

    def loader(rank: int) -> Any:
        made = backend(settings, pipeline).train_loader(splits, Placement(seed=2, rank=rank, world_size=2))
        made.sampler.set_epoch(1)
        return made

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, IndexBatch):
            return torch.equal(a.indices, b.indices) and a[1:] == b[1:]
        return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))

    states = {}
    for rank in (0, 1):
        running = loader(rank)
        batches = iter(running)
        for _ in range(3):
            next(batches)
        states[rank] = running.state_dict()
    assert states[0] == states[1] == {"epoch": 1, "batches_done": 3, "batch_size": 4, "world_size": 2}
    full = list(loader(1))
    resumed = loader(1)
    resumed.load_state_dict(states[0])
    tail = list(resumed)
    assert len(tail) == len(full) - 3 and all(same(a, b) for a, b in zip(full[3:], tail, strict=True))
