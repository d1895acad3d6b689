"""Generators of small datasets in the real on-disk formats the DataModules read (tests never download), and the
batches of a DataModule's loader as Lightning hands them to the model."""

from __future__ import annotations

import pickle
import struct
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision import datasets

SHARED_CIFAR_JPEGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg-train.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(data_dir: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 6, num_test: int = 10) -> None:
    """CIFAR-10 python pickles (5 train batches + test batch) of random pixels; md5 checks patched out."""
    folder = data_dir / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def dump(name: str, count: int) -> None:
        entry = {
            "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
            "labels": [i % 10 for i in range(count)],
        }
        (folder / name).write_bytes(pickle.dumps(entry))

    for name, _ in datasets.CIFAR10.train_list:
        dump(name, per_batch)
    dump("test_batch", num_test)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_CLASSES}))
    # The real files are checked against torchvision's md5 sums; the fake ones only have to exist.
    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, None] for n, _ in datasets.CIFAR10.train_list])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", None]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": None})


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fake_mnist(data_dir: Path, dataset_name: str, num_train: int = 24, num_test: int = 8) -> None:
    """MNIST-format idx files under `<data_dir>/<dataset_name>/raw` (MNIST or FashionMNIST)."""
    raw = data_dir / dataset_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)


def write_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4, size: int = 20, splits=("train",)
) -> Path:
    """`root/<split>/<class>/*.jpg` of random RGB JPEGs."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg")
    return root


def unpack_cifar_jpegs(dest: Path, per_class: int) -> Path:
    """The first `per_class` JPEGs of each class of the shared real CIFAR-10 set, as `dest/train/<class>/`."""
    if not SHARED_CIFAR_JPEGS.is_file():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {SHARED_CIFAR_JPEGS} (CI provides ../shared/data)")
    counts: dict[str, int] = {}
    with tarfile.open(SHARED_CIFAR_JPEGS) as archive:
        members = []
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            label = parts[-2]
            if counts.get(label, 0) < per_class:
                counts[label] = counts.get(label, 0) + 1
                members.append(member)
                if len(counts) == 10 and all(c >= per_class for c in counts.values()):
                    break
        for member in members:
            parts = Path(member.name).parts
            target = dest / "train" / parts[-2] / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return dest


def fed(dm: Any, loader: Iterable[Any], device: str = "cpu") -> list[Any]:
    """Every batch of ``loader`` as the model gets it: moved to ``device``, then the DataModule's
    ``on_after_batch_transfer`` (which converts and normalises the uint8 batches of the DataLoader path)."""
    return [dm.on_after_batch_transfer(move_data_to_device(batch, torch.device(device)), 0) for batch in loader]


def first_fed(dm: Any, loader: Iterable[Any]) -> Any:
    """The first batch of ``loader`` as the model gets it (see :func:`fed`)."""
    return fed(dm, [next(iter(loader))])[0]
