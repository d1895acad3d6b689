"""`loader: device`: the in-memory tensor path gives the standard path's batches (without augmentation),
valid CIFAR crops/flips that depend only on (seed, epoch, index), the same resume behaviour, and the same
training result."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device

from fakedata import fed, unpack_cifar_jpegs, write_fake_cifar10, write_fake_mnist, write_image_folder
from resnet_lit.cli import ResNetLitCLI
from resnet_lit.data import (
    CIFAR10DataModule,
    DataConfigError,
    DigitsDataModule,
    EvalShardSampler,
    ImageFolderDataModule,
    MNISTDataModule,
    ResumableTrainSampler,
    SyntheticDataModule,
)
from resnet_lit.data.backends import DataLoaderBackend, DeviceBackend
from resnet_lit.data.loaders import DeviceEvalLoader, DeviceTrainLoader, IndexBatch
from resnet_lit.data.seeds import sample_seed, sample_seeds

ATOL = 1e-5  # the device path fuses (x / 255 - mean) / std into one multiply-add


def device_batches(dm, loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What Lightning does with a device-path batch: move it, then the DataModule's on_after_batch_transfer."""
    assert isinstance(dm.backend, DeviceBackend)
    index_batches = list(loader)
    assert all(isinstance(b, IndexBatch) for b in index_batches)  # the device path, not a DataLoader
    return [dm.on_after_batch_transfer(move_data_to_device(b, torch.device("cpu")), 0) for b in index_batches]


def assert_same_batches(standard, device) -> None:
    assert len(standard) == len(device) > 0
    for (x1, y1), (x2, y2) in zip(standard, device, strict=True):
        assert x1.shape == x2.shape and x1.dtype == x2.dtype == torch.float32
        assert torch.equal(y1, y2)
        torch.testing.assert_close(x1, x2, atol=ATOL, rtol=0)


def assert_same_loaders(make) -> None:
    """Every split of ``make(loader)``: same batches on both paths (two epochs of training)."""
    standard, device = make("dataloader"), make("device")
    for epoch in (0, 1):
        standard_train, device_train = standard.train_dataloader(), device.train_dataloader()
        standard.train_sampler.set_epoch(epoch)
        device.train_sampler.set_epoch(epoch)
        assert_same_batches(fed(standard, standard_train), device_batches(device, device_train))
    if standard.splits().val is not None:
        assert_same_batches(fed(standard, standard.val_dataloader()), device_batches(device, device.val_dataloader()))
    if standard.splits().test is not None:
        assert_same_batches(fed(standard, standard.test_dataloader()), device_batches(device, device.test_dataloader()))


def test_sample_seeds_match_the_python_hash_bit_for_bit() -> None:
    indices = torch.tensor([0, 1, 2, 7, 49_999, 2**31 + 5, 2**40 + 3])
    for seed, epoch in [(0, 0), (1, 3), (2**62 + 12345, 7), (123456789, 2**33)]:
        assert sample_seeds(seed, epoch, indices).tolist() == [sample_seed(seed, epoch, int(i)) for i in indices]


def test_digits_batches_equal_the_standard_path() -> None:
    pytest.importorskip("sklearn")
    assert_same_loaders(lambda loader: DigitsDataModule(batch_size=32, eval_batch_size=50, loader=loader))
    assert_same_loaders(lambda loader: DigitsDataModule(batch_size=16, image_size=12, seed=3, loader=loader))


def test_synthetic_batches_equal_the_standard_path() -> None:
    assert_same_loaders(
        lambda loader: SyntheticDataModule(num_samples=70, num_val_samples=20, num_test_samples=9, batch_size=16,
                                           in_channels=2, image_size=10, drop_last=False, loader=loader)
    )  # fmt: skip


def test_mnist_batches_equal_the_standard_path_with_resize(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, "MNIST", num_train=30, num_test=10)
    assert_same_loaders(
        lambda loader: MNISTDataModule(data_dir=str(tmp_path), image_size=20, val_fraction=0.2, batch_size=8,
                                       loader=loader)
    )  # fmt: skip


def test_cifar_eval_batches_equal_the_standard_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=6, num_test=13)
    for val_fraction in (0.0, 0.2):
        standard, device = (
            CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, eval_batch_size=5, val_fraction=val_fraction,
                              loader=loader)
            for loader in ("dataloader", "device")
        )  # fmt: skip
        assert_same_batches(fed(standard, standard.val_dataloader()), device_batches(device, device.val_dataloader()))
        assert_same_batches(fed(standard, standard.test_dataloader()), device_batches(device, device.test_dataloader()))


def test_image_folder_jpegs_decode_to_the_standard_batches(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=("a", "b", "c"), per_class=5, size=36, splits=("train", "val"))
    standard, device = (
        ImageFolderDataModule(root=str(tmp_path), transform_style="cifar", image_size=32, batch_size=4,
                              eval_batch_size=4, loader=loader)
        for loader in ("dataloader", "device")
    )  # fmt: skip
    assert_same_batches(fed(standard, standard.val_dataloader()), device_batches(device, device.val_dataloader()))


def _padded(image: torch.Tensor, padding: int = 4) -> torch.Tensor:
    return F.pad(image, (padding,) * 4)


def _crops_and_flips(padded: torch.Tensor, size: int) -> list[tuple[int, int, bool, torch.Tensor]]:
    span = padded.shape[-1] - size + 1
    out = []
    for top in range(span):
        for left in range(span):
            crop = padded[:, top : top + size, left : left + size]
            out += [(top, left, False, crop), (top, left, True, crop.flip(-1))]
    return out


def test_cifar_train_augmentation_is_a_valid_crop_and_flip_seeded_by_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=8, num_test=4)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=8, loader="device", mean=(0, 0, 0), std=(1, 1, 1))
    raw = torch.as_tensor(dm.splits().train.data).permute(0, 3, 1, 2).float() / 255  # [N, C, H, W]
    loader = dm.train_dataloader()
    indices = [b.indices for b in loader]
    batches = device_batches(dm, loader)
    seen_offsets, seen_flips = set(), set()
    for index_batch, (images, targets) in zip(indices, batches, strict=True):
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert targets.tolist() == [dm.splits().train.targets[i] for i in index_batch]
        for index, image in zip(index_batch.tolist(), images, strict=True):
            matches = [(t, le, f) for t, le, f, crop in _crops_and_flips(_padded(raw[index]), 32)
                       if torch.allclose(crop, image, atol=1e-6)]  # fmt: skip
            assert matches, f"sample {index} is not a 4-pixel-padded crop (+ flip) of its image"
            # The crop and flip are bits of the per-sample seed, as documented.
            bits = sample_seed(dm.seed, 0, index)
            expected = (bits % 9, (bits // 9) % 9, bool((bits // 81) % 2))
            assert expected in matches
            seen_offsets.add(expected[:2])
            seen_flips.add(expected[2])
    assert len(seen_offsets) > 10 and seen_flips == {False, True}
    # Same (seed, epoch) -> same batches, another epoch -> other crops and order.
    again = device_batches(dm, dm.train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    loader = dm.train_dataloader()
    dm.train_sampler.set_epoch(1)
    other = device_batches(dm, loader)
    assert not torch.equal(torch.cat([b[0] for b in batches]), torch.cat([b[0] for b in other]))


def test_device_path_resumes_mid_epoch_with_the_uninterrupted_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_cifar10(tmp_path, monkeypatch, per_batch=10, num_test=4)

    def make() -> CIFAR10DataModule:
        return CIFAR10DataModule(data_dir=str(tmp_path), batch_size=6, seed=5, loader="device")

    full = make()
    loader = full.train_dataloader()
    full.train_sampler.set_epoch(2)
    uninterrupted = device_batches(full, loader)
    resumed = make()
    resumed.load_state_dict({"seed": 5, "batch_size": 6, "world_size": 1, "epoch": 2, "batches_done": 3})
    loader = resumed.train_dataloader()
    resumed.train_sampler.set_epoch(2)  # Lightning sets the restored epoch before the first batch
    assert len(loader) == len(uninterrupted)  # Lightning counts the resumed epoch from the restored progress
    tail = device_batches(resumed, loader)
    assert len(tail) == len(uninterrupted) - 3
    for (x1, y1), (x2, y2) in zip(uninterrupted[3:], tail, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_device_loaders_shard_like_the_standard_samplers() -> None:
    for rank in (0, 1, 2):
        train = DeviceTrainLoader(ResumableTrainSampler(50, num_replicas=3, rank=rank, seed=1), 4, drop_last=False)
        expected = ResumableTrainSampler(50, num_replicas=3, rank=rank, seed=1).epoch_indices(0)
        assert torch.cat([b.indices for b in train]).tolist() == expected
        assert len(train) == len(list(train)) == 5
        evaluation = DeviceEvalLoader(EvalShardSampler(50, num_replicas=3, rank=rank), 4, "val")
        assert torch.cat([b.indices for b in evaluation]).tolist() == list(EvalShardSampler(50, num_replicas=3,
                                                                                              rank=rank))  # fmt: skip
        assert all(isinstance(b, IndexBatch) and b.split == "val" for b in evaluation)
    assert len(DeviceTrainLoader(ResumableTrainSampler(50), 8, drop_last=True)) == 6


def test_unsupported_settings_are_config_errors() -> None:
    with pytest.raises(DataConfigError, match="transform styles"):
        ImageFolderDataModule(root="unused", transform_style="imagenet", loader="device")
    with pytest.raises(DataConfigError, match="'dataloader' or 'device'"):
        SyntheticDataModule(loader="gpu")  # type: ignore[arg-type]


def test_real_cifar_jpegs_in_memory(tmp_path: Path) -> None:
    root = unpack_cifar_jpegs(tmp_path, per_class=6)
    standard, device = (
        ImageFolderDataModule(root=str(root), transform_style="cifar", image_size=32, batch_size=8,
                              val_fraction=0.25, num_workers=0, loader=loader)
        for loader in ("dataloader", "device")
    )  # fmt: skip
    assert_same_batches(fed(standard, standard.val_dataloader()), device_batches(device, device.val_dataloader()))
    assert device.backend.store(device.splits()).split("train", torch.device("cpu")).images.dtype == torch.uint8


def _fit(tmp_path: Path, loader: str, epochs: int = 2) -> dict[str, float]:
    root = tmp_path / loader
    cli = ResNetLitCLI(args=[
        "fit", "--config", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.loader", loader,
    ])  # fmt: skip
    assert type(cli.datamodule.backend) is {"dataloader": DataLoaderBackend, "device": DeviceBackend}[loader]
    with open(root / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {}
    for row in rows:
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return last


@pytest.mark.slow
def test_yaml_selectable_and_same_training_result_as_the_standard_path(tmp_path: Path) -> None:
    """Digits have no augmentation, so both paths feed identical batches: the runs agree to float rounding."""
    pytest.importorskip("sklearn")
    standard, device = _fit(tmp_path, "dataloader"), _fit(tmp_path, "device")
    assert standard["val/acc"] > 0.8
    assert device["val/acc"] == pytest.approx(standard["val/acc"], abs=0.02)
    assert device["train/acc"] == pytest.approx(standard["train/acc"], abs=0.02)
    assert device["val/loss"] == pytest.approx(standard["val/loss"], rel=0.1)


@pytest.mark.parametrize("loader", ["device", "auto", "dataloader"])
def test_a_fit_that_never_validates_never_reads_the_val_images(tmp_path: Path, loader: str) -> None:
    """`trainer.limit_val_batches: 0` (the budget recipe): the set-up decodes only the train split, so a val folder
    costs nothing, not even a corrupt file in it; with validation on, the same file stops the fit naming it."""
    root = write_image_folder(tmp_path / "data", per_class=4, size=8, splits=("train", "val"))
    (root / "val" / "cat" / "0000.jpg").write_bytes(b"not a jpeg")
    args = [
        "fit", "--model.arch", "resnet20", "--data", "resnet_lit.data.ImageFolderDataModule",
        "--data.init_args.root", str(root), "--data.init_args.transform_style", "cifar",
        "--data.init_args.image_size", "8", "--data.init_args.batch_size", "4", "--data.init_args.loader", loader,
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    cli = ResNetLitCLI(args=[*args, "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"])
    assert cli.trainer.global_step == 2
    with pytest.raises(Exception, match=r"0000\.jpg"):
        ResNetLitCLI(args=args)
