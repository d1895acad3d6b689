"""CIFAR and MNIST modules read fake datasets written in torchvision's real on-disk formats (never download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fakedata import fed, first_fed, write_fake_cifar10, write_fake_mnist
from resnet_lit.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataConfigError,
    FashionMNISTDataModule,
    MNISTDataModule,
)

PER_BATCH = 6  # images per CIFAR training batch file (5 files)
NUM_TEST = 10


def test_cifar10_shapes_classes_and_official_test_as_val(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=PER_BATCH, num_test=NUM_TEST)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, augment="trivialaugment")
    assert (dm.num_classes, dm.in_channels, dm.class_names[0]) == (10, 3, "airplane")
    dm.setup("fit")
    splits = dm.splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5 * PER_BATCH, NUM_TEST, NUM_TEST)
    x, y = first_fed(dm, dm.train_dataloader())
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xv, _ = first_fed(dm, dm.val_dataloader())
    assert xv.shape == (8, 3, 32, 32)
    assert sum(len(b[1]) for b in fed(dm, dm.test_dataloader())) == NUM_TEST


def test_cifar10_val_fraction_holds_out_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=PER_BATCH, num_test=NUM_TEST)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2, batch_size=4)
    splits = dm.splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, NUM_TEST)
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert CIFAR10DataModule(data_dir=str(tmp_path), val_fraction=0.2).splits().val.indices == splits.val.indices


def test_missing_cifar_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataConfigError, match="download: true"):
        CIFAR10DataModule(data_dir=str(tmp_path)).splits()


def test_cifar100_class_names_without_data() -> None:
    dm = CIFAR100DataModule(data_dir="/nonexistent")
    assert dm.num_classes == len(dm.class_names) == 100
    assert dm.class_names[:2] == ["apple", "aquarium_fish"]


@pytest.mark.parametrize("module_cls", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_family_reads_idx_files(tmp_path: Path, module_cls: type[MNISTDataModule]) -> None:
    write_fake_mnist(tmp_path, module_cls.dataset_cls.__name__)
    dm = module_cls(data_dir=str(tmp_path), batch_size=4, val_fraction=0.25, image_size=36)
    assert (dm.num_classes, dm.in_channels, len(dm.class_names)) == (10, 1, 10)
    splits = dm.splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 6, 8)
    x, y = first_fed(dm, dm.train_dataloader())
    assert x.shape == (4, 1, 36, 36) and y.dtype == torch.int64
    assert first_fed(dm, dm.test_dataloader())[0].shape == (4, 1, 36, 36)
    native = module_cls(data_dir=str(tmp_path), batch_size=4)
    assert first_fed(native, native.val_dataloader())[0].shape[1:] == (1, 28, 28)
