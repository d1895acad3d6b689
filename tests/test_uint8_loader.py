"""The DataLoader path of image files and uint8 datasets (issue 11): workers hand over uint8 batches, and the device
converts, normalises, erases and makes them channels_last after the transfer. The result equals the batches of
the float pipeline the workers ran before (to 1e-6 on the CPU, without random erasing), for train, val, test and
predict; random erasing on the device follows torchvision's distribution, drawn from each sample's seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from fakedata import fed, write_fake_cifar10, write_fake_mnist, write_image_folder
from resnet_lit.data import (
    CIFAR10DataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    ResumableTrainSampler,
    SeededTransformDataset,
    SyntheticDataModule,
)
from resnet_lit.data.predict import PredictFolderDataset
from resnet_lit.data.seeds import sample_seed

TOLERANCE = 1e-6


def _cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=4, num_test=6)  # 20 train images
    return CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, eval_batch_size=4, augment="trivialaugment",
                             num_workers=1, seed=4, loader="dataloader")  # fmt: skip


def _mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    write_fake_mnist(tmp_path, "MNIST", num_train=16, num_test=5)
    return MNISTDataModule(data_dir=str(tmp_path), image_size=20, val_fraction=0.25, batch_size=4,
                           augment="randaugment", seed=1, loader="dataloader")  # fmt: skip


def _folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ImageDataModule:
    write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=20, splits=("train", "val"))
    write_image_folder(tmp_path / "predict", classes=("x",), per_class=3, size=18)
    return ImageFolderDataModule(root=str(tmp_path / "data"), transform_style="imagenet", image_size=16,
                                 batch_size=4, eval_batch_size=3, predict_dir=str(tmp_path / "predict"))  # fmt: skip


SOURCES = {"cifar-trivialaugment-1-worker": _cifar, "mnist-resize-randaugment": _mnist, "folder-imagenet": _folder}


def _assert_equal_batches(finished: list, todays: list) -> None:
    assert len(finished) == len(todays) > 0
    for (images, labels), (expected, expected_labels) in zip(finished, todays, strict=True):
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images, expected, atol=TOLERANCE, rtol=0)
        assert list(labels) == list(expected_labels)


def _todays_train_batches(dm: ImageDataModule, epoch: int) -> list:
    """What the workers emitted before issue 11: the float pipeline, normalised per sample, same seeds."""
    sampler = ResumableTrainSampler(len(dm.splits().train), seed=dm.seed)
    sampler.set_epoch(epoch)
    dataset = SeededTransformDataset(dm.splits().train, dm.pipeline.train())
    return list(DataLoader(dataset, batch_size=dm.settings.batch_size, sampler=sampler, drop_last=True))


@pytest.mark.parametrize("make", SOURCES.values(), ids=SOURCES.keys())
def test_uint8_batches_finished_on_the_device_equal_the_float_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[..., ImageDataModule]
) -> None:
    dm = make(tmp_path, monkeypatch)
    loader = dm.train_dataloader()
    for epoch in (0, 1):
        dm.train_sampler.set_epoch(epoch)
        raw = list(loader)
        assert all(b[0].dtype == torch.uint8 for b in raw), "the workers hand over uint8 images"
        from resnet_lit.data.finish import RawImages, SeededRawImages

        assert all(isinstance(b, SeededRawImages) for b in raw)
        seeds = torch.cat([b.seeds for b in raw]).tolist()  # each sample's augmentation seed rides along
        assert seeds == [sample_seed(dm.seed, epoch, index) for index, _ in list(dm.train_sampler)[: len(seeds)]]
        _assert_equal_batches(fed(dm, raw), _todays_train_batches(dm, epoch))

    for split in ("val", "test"):
        dataset = getattr(dm.splits(), split)
        if dataset is None:
            continue
        raw = list(getattr(dm, f"{split}_dataloader")())
        assert all(isinstance(b, RawImages) and b.images.dtype == torch.uint8 for b in raw)
        todays = DataLoader(SeededTransformDataset(dataset, dm.pipeline.eval()), batch_size=dm.settings.eval_batch_size)
        _assert_equal_batches(fed(dm, raw), list(todays))

    if dm.predict_dir is not None:
        todays = PredictFolderDataset(dm.predict_dir, dm.pipeline.eval())
        _assert_equal_batches(fed(dm, dm.predict_dataloader()), list(DataLoader(todays, batch_size=3)))


@pytest.mark.parametrize("loader", ["dataloader", "device"])
def test_true_half_precision_gets_half_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loader: str) -> None:
    """Lightning casts a batch to bf16-true's input type before the transfer, when the images are still uint8
    (or indices): the DataModule casts the float images it makes after the transfer."""
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=2, num_test=2)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=4, loader=loader)
    batch = next(iter(dm.train_dataloader()))
    plugin = HalfPrecision("bf16-true")
    dm.trainer = SimpleNamespace(precision_plugin=plugin)
    images, targets = fed(dm, [plugin.convert_input(batch)])[0]  # as Lightning: convert, move, on_after_batch_transfer
    assert images.dtype == torch.bfloat16 and targets.dtype == torch.int64


def test_float_datasets_keep_normalising_in_the_workers() -> None:
    dm = SyntheticDataModule(image_size=4, num_samples=8, num_val_samples=4, batch_size=4, loader="dataloader")
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert type(batch) is list and batch[0].dtype == torch.float32  # the default collate of (image, target)
        assert dm.on_after_batch_transfer(batch, 0) is batch


def test_device_erasing_is_drawn_per_sample_seed_with_torchvisions_distribution() -> None:
    from resnet_lit.data.erasing import erasing_boxes, random_erasing_

    count, size = 600, 40
    seeds = torch.tensor([sample_seed(7, 2, index) for index in range(count)])
    erased = random_erasing_(torch.ones(count, 3, size, size), seeds, p=0.5)
    # Per sample: the same rectangle in another batch, order and size.
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))[:50]
    assert torch.equal(random_erasing_(torch.ones(50, 3, size, size), seeds[order], p=0.5), erased[order])
    assert torch.equal(erased[:5], random_erasing_(torch.ones(5, 3, size, size), seeds[:5], p=0.5))

    zeros = erased[:, 0] == 0
    hit = zeros.flatten(1).any(dim=1)
    assert torch.equal(zeros, (erased == 0).all(dim=1))  # every channel alike
    top, left, height, width = erasing_boxes(seeds, 0.5, size, size)
    for i in torch.nonzero(hit).flatten().tolist():  # a rectangle: exactly the drawn box
        box = torch.zeros(size, size, dtype=torch.bool)
        box[top[i] : top[i] + height[i], left[i] : left[i] + width[i]] = True
        assert torch.equal(zeros[i], box)
    assert abs(hit.float().mean().item() - 0.5) < 0.08

    areas = zeros.flatten(1).sum(dim=1)[hit].float() / size**2
    ratios = (height[hit] / width[hit]).float()
    assert areas.min() >= 0.015 and areas.max() <= 0.345 and ratios.min() >= 0.25 and ratios.max() <= 3.6
    torch.manual_seed(0)
    reference = v2.RandomErasing(p=1.0)
    torchvision_areas = torch.tensor([(reference(torch.ones(1, size, size)) == 0).float().mean().item()
                                      for _ in range(400)])  # fmt: skip
    assert abs(areas.mean().item() - torchvision_areas.mean().item()) < 0.03

    assert not (random_erasing_(torch.ones(count, 1, size, size), seeds, p=0.0) == 0).any()


def test_random_erasing_is_the_same_on_both_loader_paths(tmp_path: Path) -> None:
    """Plain-style MNIST with random erasing: the DataLoader path and the in-memory device path draw the same
    rectangles from the same sample seeds, on the same normalised images."""
    write_fake_mnist(tmp_path, "MNIST", num_train=16, num_test=4)
    standard, device = (MNISTDataModule(data_dir=str(tmp_path), val_fraction=0.25, batch_size=4, random_erasing=0.6,
                                        loader=loader) for loader in ("dataloader", "device"))  # fmt: skip
    for epoch in (0, 1):
        standard_loader, device_loader = standard.train_dataloader(), device.train_dataloader()
        standard.train_sampler.set_epoch(epoch)
        device.train_sampler.set_epoch(epoch)
        standard_batches, device_batches = fed(standard, standard_loader), fed(device, device_loader)
        assert any((images == 0).any() for images, _ in standard_batches)  # something was erased
        _assert_equal_batches(standard_batches, device_batches)
