"""DigitsDataModule (real scikit-learn data) and SyntheticDataModule."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnet_lit.data import DigitsDataModule, SyntheticDataModule


def test_digits_splits_and_batches() -> None:
    pytest.importorskip("sklearn")
    dm = DigitsDataModule(batch_size=32, loader="dataloader")
    assert (dm.num_classes, dm.in_channels) == (10, 1)
    splits = dm.splits()
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 270
    assert set(splits.train.indices).isdisjoint(splits.val.indices)
    assert DigitsDataModule().splits().test.indices == splits.test.indices
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    everything = torch.cat([b[0] for b in dm.val_dataloader()])
    assert abs(float(everything.mean())) < 0.2 and 0.8 < float(everything.std()) < 1.2  # normalized
    loader = DigitsDataModule(image_size=16, batch_size=4, loader="dataloader").train_dataloader()
    assert next(iter(loader))[0].shape == (4, 1, 16, 16)


def test_digits_without_sklearn_explains_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"resnet-lit\[digits\]"):
        DigitsDataModule().splits()


def test_synthetic_is_deterministic_per_seed() -> None:
    dm = SyntheticDataModule(num_classes=5, in_channels=2, image_size=12, num_samples=40, batch_size=8,
                             loader="dataloader")
    assert (dm.num_classes, dm.in_channels, len(dm.class_names)) == (5, 2, 5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2, 12, 12) and int(y.max()) < 5
    again = next(iter(SyntheticDataModule(num_classes=5, in_channels=2, image_size=12, num_samples=40,
                                          batch_size=8, loader="dataloader").train_dataloader()))  # fmt: skip
    assert torch.equal(x, again[0])
    other = SyntheticDataModule(num_classes=5, in_channels=2, image_size=12, num_samples=40, batch_size=8, seed=1,
                                loader="dataloader")
    assert not torch.equal(x, next(iter(other.train_dataloader()))[0])
    assert len(list(dm.val_dataloader())) == 32  # 256 val samples, eval batch = 8


def test_grayscale_predict_folder_uses_eval_transform(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    for i in range(3):
        Image.new("RGB", (20, 24), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    dm = DigitsDataModule(predict_dir=str(tmp_path), image_size=8, eval_batch_size=3)
    images, paths = next(iter(dm.predict_dataloader()))
    assert images.shape == (3, 1, 8, 8)
    assert [Path(p).name for p in paths] == ["0.png", "1.png", "2.png"]
