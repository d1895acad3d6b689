"""Samples per class of a dataset, read from its labels without decoding any image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .errors import DataConfigError


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The class index of every sample of `dataset`, in order, as int64.

    Cheap where the dataset says its labels: `Subset` picks from its parent's, torchvision datasets and
    `TensorImageDataset` have `targets`, image-file datasets list `(path, target)` samples. Anything else is
    iterated (the one case that may load its images).
    """
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.int64)]
    targets: Any = getattr(dataset, "targets", None)
    if targets is None and isinstance(getattr(dataset, "samples", None), Sequence):
        targets = [target for _, target in dataset.samples]  # type: ignore[attr-defined]
    if targets is None:
        targets = [int(dataset[index][1]) for index in range(len(dataset))]  # type: ignore[arg-type]
    return torch.as_tensor(targets, dtype=torch.int64).reshape(-1)


def class_counts(dataset: Dataset, num_classes: int) -> list[int]:
    """How many samples of `dataset` each of the `num_classes` classes has (0 for a class without samples)."""
    targets = dataset_targets(dataset)
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise DataConfigError(
            f"the training split has labels from {int(targets.min())} to {int(targets.max())}, "
            f"outside the {num_classes} classes 0..{num_classes - 1}"
        )
    return torch.bincount(targets, minlength=num_classes).tolist()
