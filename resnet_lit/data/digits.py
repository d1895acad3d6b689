"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes): real data, no download."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Subset

from .base import ImageDataModule
from .datasets import TensorImageDataset
from .errors import DataConfigError
from .seeds import mix_seed
from .splits import RawSplits


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float ``[N, 1, 8, 8]`` in [0, 1] (raw values 0..16 scaled) and int64 targets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError('DigitsDataModule needs scikit-learn: pip install "resnet-lit[digits]"') from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


class DigitsDataModule(ImageDataModule):
    """Digits split by a seeded permutation into train / val (``val_fraction``) / test (``test_fraction``).

    Native 8x8, 1 channel; ``image_size`` upscales. ``augment`` is off by default (tiny images).

    Args:
        val_fraction: Share of the images used for validation.
        test_fraction: Share of the images used for test.
        image_size: Resize to this square side; None keeps 8.
        batch_size: Training batch size per process.
    """

    default_mean = (0.3053,)
    default_std = (0.3760,)
    in_channels = 1
    normalize_on_device = False  # float images: the workers normalise them

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        image_size: int | None = None,
        batch_size: int = 64,
        **kwargs: Any,
    ) -> None:
        if not (0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise DataConfigError(
                f"need 0 <= test_fraction and val_fraction + test_fraction < 1, got {val_fraction}, {test_fraction}"
            )
        super().__init__(
            val_fraction=val_fraction,
            batch_size=batch_size,
            transform_style="plain",
            crop_size=image_size,
            resize_size=image_size,
            **kwargs,
        )
        self.test_fraction = test_fraction

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def load_splits(self) -> RawSplits:
        full = TensorImageDataset(*load_digits_tensors())
        generator = torch.Generator().manual_seed(mix_seed(self.seed, 0xD161))
        order = torch.randperm(len(full), generator=generator).tolist()
        num_val, num_test = round(len(full) * self.val_fraction), round(len(full) * self.test_fraction)
        val, test, train = order[:num_val], order[num_val : num_val + num_test], order[num_val + num_test :]
        return RawSplits(
            train=Subset(full, sorted(train)),
            val=Subset(full, sorted(val)) if val else None,
            test=Subset(full, sorted(test)) if test else None,
        )
