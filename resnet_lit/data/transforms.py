"""Train/eval transform builders (torchvision.transforms.v2).

Styles:
* ``imagenet``: train RandomResizedCrop(crop) + flip; eval Resize(resize) + CenterCrop(crop).
* ``cifar``: train [Resize(size)] + RandomCrop(size, padding=4) + flip; eval Resize(size) + CenterCrop(size).
* ``plain``: no crop or flip (digits, MNIST); only an optional resize. Eval is the same resize.

Inputs may be PIL images or tensors (uint8 or float in [0, 1]). Outputs are normalized float32 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchvision.transforms import v2

TransformStyle = Literal["imagenet", "cifar", "plain"]
Augment = Literal["none", "trivialaugment", "randaugment"]


def _augmentation(augment: Augment) -> list[v2.Transform]:
    if augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if augment == "randaugment":
        return [v2.RandAugment()]
    if augment == "none":
        return []
    raise ValueError(f"augment must be 'none', 'trivialaugment' or 'randaugment', got {augment!r}")


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def build_train_transform(
    style: TransformStyle,
    *,
    crop_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
    augment: Augment = "none",
    random_erasing: float = 0.0,
) -> v2.Compose:
    """Training pipeline: geometric augmentation by ``style``, then ``augment``, normalize, random erasing.

    ``crop_size`` is the output size; ``None`` keeps the input size (only allowed for ``plain``).
    """
    geometric: list[v2.Transform]
    if style == "imagenet":
        if crop_size is None:
            raise ValueError("the imagenet transform style needs a crop_size")
        geometric = [v2.RandomResizedCrop(crop_size, antialias=True), v2.RandomHorizontalFlip()]
    elif style == "cifar":
        if crop_size is None:
            raise ValueError("the cifar transform style needs an image_size")
        geometric = [
            v2.Resize(crop_size, antialias=True),
            v2.CenterCrop(crop_size),
            v2.RandomCrop(crop_size, padding=4),
            v2.RandomHorizontalFlip(),
        ]
    elif style == "plain":
        geometric = [] if crop_size is None else [v2.Resize((crop_size, crop_size), antialias=True)]
    else:
        raise ValueError(f"unknown transform style {style!r}")
    erasing = [v2.RandomErasing(p=random_erasing)] if random_erasing > 0 else []
    return v2.Compose([v2.ToImage(), *geometric, *_augmentation(augment), *_to_normalized(mean, std), *erasing])


def build_eval_transform(
    style: TransformStyle,
    *,
    crop_size: int | None,
    resize_size: int | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    """Deterministic pipeline for val/test/predict: resize (shorter side), center crop, normalize."""
    geometric: list[v2.Transform] = []
    if style == "plain":
        if crop_size is not None:
            geometric = [v2.Resize((crop_size, crop_size), antialias=True)]
    elif crop_size is not None:
        geometric = [v2.Resize(resize_size or crop_size, antialias=True), v2.CenterCrop(crop_size)]
    return v2.Compose([v2.ToImage(), *geometric, *_to_normalized(mean, std)])
