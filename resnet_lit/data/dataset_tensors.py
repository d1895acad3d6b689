"""Whole datasets as one NHWC image tensor and a target tensor, for the in-memory store of ``loader: device``.

Known in-memory datasets (torchvision CIFAR/MNIST, tensor datasets, subsets of them) are converted without a
per-image loop; anything else (image files) is decoded once through a DataLoader.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from .datasets import TensorImageDataset


def dataset_tensors(dataset: Dataset, geometric: v2.Transform | None, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(NHWC images, int64 targets)`` of ``dataset``: uint8 for image files and CIFAR/MNIST, float for tensors.

    ``geometric`` is the deterministic part of the standard pipeline (resize, center crop), applied once with
    the same torchvision functions; the decoding DataLoader runs ``num_workers`` processes.
    """
    found = _fast_tensors(dataset)
    if found is None:
        return _decode_all(dataset, geometric, num_workers)
    images, targets = found
    if geometric is not None:
        images = geometric(v2.functional.to_image(images)).as_subclass(Tensor)  # batched NCHW resize / crop
    return images.permute(0, 2, 3, 1).contiguous(), targets


def _fast_tensors(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(NCHW images, targets)`` read straight from a known in-memory dataset, or None."""
    if isinstance(dataset, Subset):
        inner = _fast_tensors(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return inner[0][index], inner[1][index]
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.targets.to(torch.int64)
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is None or targets is None or getattr(dataset, "transform", None) is not None:
        return None
    images = torch.as_tensor(data)
    if images.dtype != torch.uint8:
        return None
    if images.ndim == 3:  # MNIST: [N, H, W]
        images = images.unsqueeze(1)
    elif images.ndim == 4 and images.shape[-1] in (1, 3):  # CIFAR: [N, H, W, C] numpy
        images = images.permute(0, 3, 1, 2)
    else:
        return None
    return images, torch.as_tensor(targets, dtype=torch.int64)


class _Prepared(Dataset):
    def __init__(self, base: Dataset, geometric: v2.Transform) -> None:
        self.base = base
        self.geometric = geometric

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.base[index]
        return self.geometric(image), int(target)


def _decode_all(dataset: Dataset, geometric: v2.Transform | None, num_workers: int) -> tuple[Tensor, Tensor]:
    transform = v2.Compose([v2.ToImage(), *([geometric] if geometric is not None else [])])
    loader = DataLoader(_Prepared(dataset, transform), batch_size=256, num_workers=num_workers, collate_fn=_stack)
    images, targets = [], []
    for batch_images, batch_targets in loader:
        images.append(batch_images)
        targets.append(batch_targets)
    if not images:
        raise ValueError("cannot build an in-memory store of an empty dataset")
    return torch.cat(images), torch.cat(targets)


def _stack(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    shapes = {tuple(image.shape) for image, _ in items}
    if len(shapes) != 1:
        raise ValueError(
            f"loader: device needs images of one size after the eval resize/crop, found shapes {sorted(shapes)}"
        )
    images = torch.stack([image.permute(1, 2, 0) for image, _ in items])
    return images, torch.tensor([target for _, target in items], dtype=torch.int64)
