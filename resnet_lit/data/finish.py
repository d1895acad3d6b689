"""The ``dataloader`` path's batches of raw images, and what the training device does with them after the transfer.

DataLoader workers decode and augment each image geometrically (crop, flip, resize, TrivialAugment, RandAugment)
in uint8 and hand the batch over as :class:`RawImages` (or :class:`SeededRawImages` for training): a quarter of
the bytes of float32, pinned and copied with ``non_blocking`` by Lightning on a GPU. The DataModule's
``on_after_batch_transfer`` then finishes the batch on the device through :class:`BatchFinisher`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from .erasing import random_erasing_
from .normalize import Normalizer
from .transforms import ImagePipeline


class RawImages(NamedTuple):
    """Images ``[B, C, H, W]`` (uint8 for image files) not yet converted or normalised, and their labels: class
    indices, or the file paths of ``predict``."""

    images: Tensor
    labels: Any


class SeededRawImages(NamedTuple):
    """A training batch of raw images with the augmentation seed of each sample, from which random erasing draws."""

    images: Tensor
    targets: Tensor
    seeds: Tensor


class BatchFinisher:
    """Turns a transferred raw batch into ``(images, labels)``: float32, normalised, channels_last, and for
    training randomly erased per sample seed (the workers' pipeline leaves these steps out, see
    :meth:`~resnet_lit.data.transforms.ImagePipeline.train`). Other batches pass unchanged."""

    def __init__(self, pipeline: ImagePipeline) -> None:
        self.normalize = Normalizer(pipeline.mean, pipeline.std)
        self.random_erasing = pipeline.random_erasing

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, SeededRawImages):
            images = self.normalize(batch.images)
            if self.random_erasing > 0:
                random_erasing_(images, batch.seeds, self.random_erasing)
            return images, batch.targets
        if isinstance(batch, RawImages):
            return self.normalize(batch.images), batch.labels
        return batch
