"""The in-memory store of ``loader: device``: every split as one uint8 tensor on the training device.

An :class:`~resnet_lit.data.loaders.IndexBatch` becomes ``(images, targets)`` in one batched gather there: the
CIFAR random crop (zero padding) and flip as index arithmetic seeded by ``(seed, epoch, index)`` (a repeated
sample's draw instead of its index), then ``augment`` (TrivialAugmentWide or RandAugment per image, see
:mod:`~resnet_lit.data.batch_augment`), the normalisation and random erasing, so no DataLoader decodes, augments
or collates images one by one on the CPU. torchvision's order: geometry, ``augment``, normalisation, erasing.
Without crop, flip and ``augment`` the batches equal the DataLoader path's (normalisation and erasing are the same
code, see :mod:`~resnet_lit.data.finish`). Images are stored NHWC: a gathered batch is already ``channels_last``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .batch_augment import batch_augment
from .dataset_tensors import dataset_tensors
from .erasing import random_erasing_
from .loaders import IndexBatch
from .normalize import Normalizer
from .seeds import sample_seeds
from .splits import RawSplits
from .transforms import Augment, ImagePipeline


@dataclass
class SplitTensors:
    """One split on a device: NHWC images (uint8, or float in [0, 1]) and int64 targets."""

    images: Tensor
    targets: Tensor


class DeviceImageStore:
    """Per-split image tensors, built and moved to the training device on first use; the batched augmentation.

    Args:
        splits: split name -> a function building its CPU tensors (NHWC images, targets), called once.
        mean, std: normalisation per channel (of images scaled to [0, 1]).
        crop_padding: zero padding of the random crop of the ``train`` split; 0 disables the crop.
        flip: random horizontal flip of the ``train`` split.
        random_erasing: probability of random erasing (after normalisation) of a ``train`` image.
        augment: TrivialAugmentWide or RandAugment of each ``train`` image after the crop and flip, drawn from its
            sample seed. Float images (in [0, 1]) are rounded to 8 bits for it, as the uint8 ops need.
    """

    def __init__(
        self,
        splits: Mapping[str, Callable[[], SplitTensors]],
        *,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool = False,
        random_erasing: float = 0.0,
        augment: Augment = "none",
    ) -> None:
        self._builders = dict(splits)
        self._cpu: dict[str, SplitTensors] = {}
        self._on_device: dict[tuple[str, str], SplitTensors] = {}
        self.normalize = Normalizer(mean, std)
        self.crop_padding = crop_padding
        self.flip = flip
        self.random_erasing = random_erasing
        self.augment = augment

    @classmethod
    def from_splits(cls, splits: RawSplits, pipeline: ImagePipeline, num_workers: int = 0) -> DeviceImageStore:
        """A store of ``splits`` after the deterministic geometry of ``pipeline``, decoded on first use."""
        built: dict[tuple[int, bool], SplitTensors] = {}  # CIFAR's val split is its test split: build it once

        def builder(dataset: Dataset, train: bool) -> Callable[[], SplitTensors]:
            def build() -> SplitTensors:
                key = (id(dataset), train)
                if key not in built:
                    built[key] = SplitTensors(*dataset_tensors(dataset, pipeline.geometry(train), num_workers))
                return built[key]

            return build

        builders = {
            name: builder(dataset, name == "train")
            for name in ("train", "val", "test")
            if (dataset := getattr(splits, name)) is not None
        }
        cifar = pipeline.style == "cifar"
        return cls(
            builders,
            mean=pipeline.mean,
            std=pipeline.std,
            crop_padding=4 if cifar else 0,
            flip=cifar,
            random_erasing=pipeline.random_erasing,
            augment=pipeline.augment,
        )

    @property
    def split_names(self) -> list[str]:
        return list(self._builders)

    def cpu(self, name: str) -> SplitTensors:
        """The split's tensors on the CPU, built (decoded, resized) on the first call."""
        if name not in self._cpu:
            if name not in self._builders:
                raise KeyError(f"no {name!r} split in the device store (splits: {', '.join(self._builders)})")
            self._cpu[name] = self._builders[name]()
        return self._cpu[name]

    def split(self, name: str, device: torch.device) -> SplitTensors:
        """The split's tensors on ``device`` (the train split zero-padded for the random crop)."""
        key = (name, str(device))
        if key not in self._on_device:
            tensors = self.cpu(name)
            images = tensors.images
            if name == "train" and self.crop_padding:
                p = self.crop_padding
                images = torch.nn.functional.pad(images, (0, 0, p, p, p, p))  # NHWC: pad W and H
            # Reuse a tensor already moved for another split (CIFAR's val split is its test split).
            moved = next(
                (t for (n, d), t in self._on_device.items() if d == str(device) and self._cpu[n] is tensors), None
            )
            if moved is not None and not (name == "train" and self.crop_padding):
                self._on_device[key] = moved
            else:
                self._on_device[key] = SplitTensors(images.to(device), tensors.targets.to(device))
        return self._on_device[key]

    def materialize(self, batch: IndexBatch) -> tuple[Tensor, Tensor]:
        """``(normalised float images [B, C, H, W] in channels_last memory, targets [B])`` of an index batch."""
        indices = batch.indices
        data = self.split(batch.split, indices.device)
        augmented = batch.split == "train" and (
            self.crop_padding or self.flip or self.random_erasing > 0 or self.augment != "none"
        )
        draws = indices if batch.draws is None else batch.draws  # a repeated sample's draw seeds its augmentation
        seeds = sample_seeds(batch.seed, batch.epoch, draws) if augmented else None
        if seeds is not None and (self.crop_padding or self.flip):
            images = self._augmented(data.images, indices, seeds)
        else:
            images = data.images[indices]
        images = images.permute(0, 3, 1, 2)
        if seeds is not None and self.augment != "none":
            images = batch_augment(self.augment, _as_uint8(images), seeds)
        normalized = self.normalize(images)
        if seeds is not None and self.random_erasing > 0:
            random_erasing_(normalized, seeds, self.random_erasing)
        return normalized, data.targets[indices]

    def _augmented(self, padded: Tensor, indices: Tensor, bits: Tensor) -> Tensor:
        """Random crop + flip as one gather: ``[B, H, W, C]`` from the padded ``[N, H+2p, W+2p, C]``."""
        p = self.crop_padding
        height, width = padded.shape[1] - 2 * p, padded.shape[2] - 2 * p
        span = 2 * p + 1
        top, left = bits % span, (bits // span) % span
        rows = top[:, None] + torch.arange(height, device=indices.device)
        cols = torch.arange(width, device=indices.device).expand(len(indices), width)
        if self.flip:
            flipped = ((bits // (span * span)) % 2).bool()
            cols = torch.where(flipped[:, None], width - 1 - cols, cols)
        cols = cols + left[:, None]
        return padded[indices[:, None, None], rows[:, :, None], cols[:, None, :]]


def _as_uint8(images: Tensor) -> Tensor:
    """uint8 images as they are; float images in [0, 1] rounded to 0..255."""
    if images.dtype == torch.uint8:
        return images
    return images.mul(255).clamp_(0, 255).round_().to(torch.uint8)
