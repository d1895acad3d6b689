"""ImageFolderDataModule: layout errors, corrupt images, predict folders, and a cut of the real CIFAR-10 JPEGs."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from fakedata import fed, first_fed
from resnet_lit.data import CorruptImageError, DataConfigError, ImageFolderDataModule

CIFAR_JPG_TAR = Path("/work/shared/data/cifar10-jpg-train.tar.gz")


def _write_images(folder: Path, count: int, size: int = 20, color: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (size + i, size), (color, 10 * i, 100)).save(folder / f"img_{i}.png")


def _make_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        _write_images(root / "train" / name, per_class, color=60 * c)
    return root


def _module(root: Path, **kwargs: object) -> ImageFolderDataModule:
    defaults = {"image_size": 16, "batch_size": 4, "val_fraction": 0.25}
    return ImageFolderDataModule(str(root), **{**defaults, **kwargs})  # type: ignore[arg-type]


def test_properties_need_no_setup(tmp_path: Path) -> None:
    dm = _module(_make_tree(tmp_path, ("b_dog", "a_cat", "c_eel")))
    assert (dm.num_classes, dm.in_channels, dm.class_names) == (3, 3, ["a_cat", "b_dog", "c_eel"])


def test_batches_split_and_predict(tmp_path: Path) -> None:
    root = _make_tree(tmp_path / "data")
    _write_images(tmp_path / "predict" / "nested", 3)
    dm = _module(root, predict_dir=str(tmp_path / "predict"), eval_batch_size=2)
    dm.setup("fit")
    splits = dm.splits()
    assert (len(splits.train), len(splits.val), splits.test) == (6, 2, None)
    x, y = first_fed(dm, dm.train_dataloader())
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, y = first_fed(dm, dm.val_dataloader())
    assert x.shape == (2, 3, 16, 16)
    images, paths = first_fed(dm, dm.predict_dataloader())
    assert images.shape == (2, 3, 16, 16)
    assert all(p.endswith(".png") and "nested" in p for p in paths)


def test_val_and_test_folders_are_used(tmp_path: Path) -> None:
    root = _make_tree(tmp_path)
    for split in ("val", "test"):
        for name in ("cat", "dog"):
            _write_images(root / split / name, 1)
    dm = _module(root)
    splits = dm.splits()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)
    assert first_fed(dm, dm.test_dataloader())[0].shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no train folder"),
        (
            lambda root: (root / "train" / "cat").mkdir(parents=True) or _write_images(root / "train" / "dog", 1),
            "train/cat",
        ),
        (
            lambda root: _make_tree(root) and _write_images(root / "val" / "cow", 1),
            "missing ['cat', 'dog'], extra ['cow']",
        ),
    ],
)
def test_layout_errors_say_what_to_fix(tmp_path: Path, prepare, message: str) -> None:
    root = tmp_path / "data"
    prepare(root)
    with pytest.raises(DataConfigError, match=None) as info:
        _module(root).splits()
    assert message in str(info.value)


def _make_corrupt_tree(root: Path) -> tuple[Path, Path]:
    _make_tree(root, per_class=4)
    good = root / "train" / "cat" / "img_0.png"
    truncated = root / "train" / "cat" / "truncated.jpg"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(truncated, quality=95)
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = root / "train" / "dog" / "garbage.png"
    garbage.write_bytes(os.urandom(500))
    assert good.exists()
    return truncated, garbage


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_error_names_the_file(tmp_path: Path, num_workers: int) -> None:
    _make_corrupt_tree(tmp_path)
    dm = _module(tmp_path, val_fraction=0.0, num_workers=num_workers, batch_size=10)
    with pytest.raises(CorruptImageError) as info:
        list(dm.train_dataloader())
    assert "truncated.jpg" in str(info.value) or "garbage.png" in str(info.value)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_corrupt_replaces_and_counts(tmp_path: Path, num_workers: int) -> None:
    _make_corrupt_tree(tmp_path)
    dm = _module(tmp_path, val_fraction=0.0, num_workers=num_workers, batch_size=5, skip_corrupt=True)
    batches = fed(dm, dm.train_dataloader())
    assert [x.shape[0] for x, _ in batches] == [5, 5]
    assert dm.corrupt_skipped == 2
    list(dm.train_dataloader())
    assert dm.corrupt_skipped == 4  # counts replacement events, one per bad file per epoch


def _unpack_cifar_subset(dest: Path, per_class: int) -> Path:
    counts: dict[str, int] = {}
    with tarfile.open(CIFAR_JPG_TAR) as archive:
        members = []
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "train":
                cls = parts[-2]
                if counts.get(cls, 0) < per_class:
                    counts[cls] = counts.get(cls, 0) + 1
                    members.append(member)
            if len(counts) == 10 and all(n >= per_class for n in counts.values()):
                break
        archive.extractall(dest, members=members, filter="data")
    return next(p.parent for p in dest.rglob("train") if p.is_dir())


@pytest.mark.skipif(not CIFAR_JPG_TAR.exists(), reason=f"real CIFAR-10 JPEGs not found at {CIFAR_JPG_TAR}")
def test_real_cifar_jpegs_with_cifar_style(tmp_path: Path) -> None:
    root = _unpack_cifar_subset(tmp_path, per_class=20)
    dm = ImageFolderDataModule(
        str(root), transform_style="cifar", image_size=32, batch_size=16, val_fraction=0.1, num_workers=2
    )
    assert dm.num_classes == 10 and "airplane" in dm.class_names
    x, y = first_fed(dm, dm.train_dataloader())
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1.0  # normalized
    xv, _ = first_fed(dm, dm.val_dataloader())
    assert xv.shape[1:] == (3, 32, 32)
    assert len(dm.splits().val) == 20
