"""Seeded random images held in memory, for smoke runs and benchmarks (no files, no download)."""

from __future__ import annotations

import torch

from .base import ImageDataModule, LoaderKind, RawSplits
from .datasets import TensorImageDataset
from .samplers import mix_seed
from .transforms import Augment


def make_synthetic(
    num_samples: int, num_classes: int, in_channels: int, image_size: int, *, pattern_seed: int, seed: int
) -> TensorImageDataset:
    """Images in [0, 1]: uniform noise plus a per-class pattern (from ``pattern_seed``), so a model can learn."""
    pattern_generator = torch.Generator().manual_seed(pattern_seed)
    patterns = torch.rand(num_classes, in_channels, image_size, image_size, generator=pattern_generator)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    noise = torch.rand(num_samples, in_channels, image_size, image_size, generator=generator)
    return TensorImageDataset(0.5 * noise + 0.5 * patterns[targets], targets)


class SyntheticDataModule(ImageDataModule):
    """Random ``[in_channels, image_size, image_size]`` images with ``num_classes`` labels, deterministic per seed.

    Train, val and test are independent draws sharing the per-class patterns. No geometric augmentation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        num_samples: int = 1024,
        num_val_samples: int = 256,
        num_test_samples: int = 256,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        augment: Augment = "none",
        random_erasing: float = 0.0,
        predict_dir: str | None = None,
        loader: LoaderKind = "dataloader",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
            val_fraction=0.0,
            seed=seed,
            augment=augment,
            random_erasing=random_erasing,
            mean=(0.5,) * in_channels,
            std=(0.25,) * in_channels,
            predict_dir=predict_dir,
            transform_style="plain",
            crop_size=None,
            resize_size=None,
            loader=loader,
        )
        self._num_classes = num_classes
        self._in_channels = in_channels
        self.image_size = image_size
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.num_test_samples = num_test_samples

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def class_names(self) -> list[str]:
        return [f"class_{i}" for i in range(self._num_classes)]

    def _draw(self, split: int, size: int) -> TensorImageDataset:
        shape = (self._num_classes, self._in_channels, self.image_size)
        return make_synthetic(size, *shape, pattern_seed=mix_seed(self.seed), seed=mix_seed(self.seed, split))

    def load_splits(self) -> RawSplits:
        return RawSplits(
            train=self._draw(0, self.num_samples),
            val=self._draw(1, self.num_val_samples) if self.num_val_samples else None,
            test=self._draw(2, self.num_test_samples) if self.num_test_samples else None,
        )
