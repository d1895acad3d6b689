"""Train/eval transform pipelines (torchvision.transforms.v2) of a DataModule, by style.

* ``imagenet``: train RandomResizedCrop(crop) + flip; eval Resize(resize) + CenterCrop(crop).
* ``cifar``: train [Resize(size)] + RandomCrop(size, padding=4) + flip; eval Resize(size) + CenterCrop(size).
* ``plain``: no crop or flip (digits, MNIST); only an optional resize. Eval is the same resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchvision.transforms import v2

TransformStyle = Literal["imagenet", "cifar", "plain"]
Augment = Literal["none", "trivialaugment", "randaugment"]


@dataclass(frozen=True)
class ImagePipeline:
    """The transform settings of a DataModule; inputs are PIL images or tensors, outputs normalised float32 (or, with
    ``normalize=False``, the images before the conversion to float).

    ``crop_size`` is the output size; ``None`` keeps the input size (only allowed for ``plain``).
    """

    style: TransformStyle
    crop_size: int | None
    resize_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment = "none"
    random_erasing: float = 0.0

    def train(self, normalize: bool = True) -> v2.Compose:
        """Geometric augmentation by ``style``, then ``augment``, normalisation and random erasing.

        ``normalize=False`` stops before the conversion to float: uint8 images stay uint8, and the training device
        converts, normalises and erases them (:class:`~resnet_lit.data.finish.BatchFinisher`).
        """
        geometric: list[v2.Transform]
        if self.style == "imagenet":
            geometric = [v2.RandomResizedCrop(self._crop(), antialias=True), v2.RandomHorizontalFlip()]
        elif self.style == "cifar":
            size = self._crop()
            geometric = [
                v2.Resize(size, antialias=True),
                v2.CenterCrop(size),
                v2.RandomCrop(size, padding=4),
                v2.RandomHorizontalFlip(),
            ]
        elif self.style == "plain":
            geometric = [] if self.crop_size is None else [v2.Resize((self.crop_size,) * 2, antialias=True)]
        else:
            raise ValueError(f"unknown transform style {self.style!r}")
        erasing = [v2.RandomErasing(p=self.random_erasing)] if self.random_erasing > 0 else []
        finish = [*self._normalize(), *erasing] if normalize else []
        return v2.Compose([v2.ToImage(), *geometric, *_augmentation(self.augment), *finish])

    def eval(self, normalize: bool = True) -> v2.Compose:
        """The deterministic pipeline of val/test/predict: resize (shorter side), center crop, normalise
        (``normalize=False``: left to the device, as in :meth:`train`)."""
        geometric: list[v2.Transform] = []
        if self.style == "plain":
            if self.crop_size is not None:
                geometric = [v2.Resize((self.crop_size,) * 2, antialias=True)]
        elif self.crop_size is not None:
            geometric = [v2.Resize(self.resize_size or self.crop_size, antialias=True), v2.CenterCrop(self.crop_size)]
        return v2.Compose([v2.ToImage(), *geometric, *(self._normalize() if normalize else [])])

    def geometry(self, train: bool) -> v2.Transform | None:
        """The deterministic geometric steps of :meth:`train` or :meth:`eval`, for images decoded once.

        ``cifar``: train Resize(size) + CenterCrop(size) (the random crop and flip are left out); eval
        Resize(resize_size) + CenterCrop(size). ``plain``: the optional Resize((size, size)), train and eval.
        """
        if self.style == "plain":
            return None if self.crop_size is None else v2.Resize((self.crop_size,) * 2, antialias=True)
        if self.style == "cifar":
            size = self._crop()
            resize = size if train else (self.resize_size or size)
            return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
        raise ValueError(f"the {self.style!r} transform style has random geometry only")

    def _crop(self) -> int:
        if self.crop_size is None:
            raise ValueError(f"the {self.style} transform style needs an image_size")
        return self.crop_size

    def _normalize(self) -> list[v2.Transform]:
        return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(self.mean), std=list(self.std))]


def _augmentation(augment: Augment) -> list[v2.Transform]:
    if augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if augment == "randaugment":
        return [v2.RandAugment()]
    if augment == "none":
        return []
    raise ValueError(f"augment must be 'none', 'trivialaugment' or 'randaugment', got {augment!r}")
