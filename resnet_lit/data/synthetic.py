"""Seeded random images held in memory, for smoke runs and benchmarks (no files, no download)."""

from __future__ import annotations

from typing import Any

import torch

from .base import ImageDataModule
from .datasets import TensorImageDataset
from .errors import DataConfigError, require_positive
from .seeds import mix_seed
from .splits import RawSplits


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

    Args:
        num_classes: Number of labels.
        in_channels: Image channels.
        image_size: Image side.
        num_samples: Training images.
        num_val_samples: Validation images (0: no validation).
        num_test_samples: Test images (0: no test split).
    """

    normalize_on_device = False  # float images: the workers normalise them

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        num_samples: int = 1024,
        num_val_samples: int = 256,
        num_test_samples: int = 256,
        **kwargs: Any,
    ) -> None:
        require_positive(
            num_classes=num_classes, in_channels=in_channels, image_size=image_size, num_samples=num_samples
        )
        if num_val_samples < 0 or num_test_samples < 0:
            raise DataConfigError(
                f"num_val_samples and num_test_samples must be 0 or more, got {num_val_samples} and {num_test_samples}"
            )
        super().__init__(
            val_fraction=0.0,
            mean=(0.5,) * in_channels,
            std=(0.25,) * in_channels,
            transform_style="plain",
            crop_size=None,
            resize_size=None,
            **kwargs,
        )
        self._num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_samples = num_samples
        self.num_val_samples = num_val_samples
        self.num_test_samples = num_test_samples

    @property
    def class_names(self) -> list[str]:
        return [f"class_{i}" for i in range(self._num_classes)]

    def _draw(self, split: int, size: int) -> TensorImageDataset:
        shape = (self._num_classes, self.in_channels, self.image_size)
        return make_synthetic(size, *shape, pattern_seed=mix_seed(self.seed), seed=mix_seed(self.seed, split))

    def load_splits(self) -> RawSplits:
        return RawSplits(
            train=self._draw(0, self.num_samples),
            val=self._draw(1, self.num_val_samples) if self.num_val_samples else None,
            test=self._draw(2, self.num_test_samples) if self.num_test_samples else None,
        )
