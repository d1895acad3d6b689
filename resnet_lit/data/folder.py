"""ImageFolder-layout datasets: ``root/train/<class>/*`` with optional ``root/val`` and ``root/test``."""

from __future__ import annotations

import os
from typing import Any, Literal

from .base import ImageDataModule
from .datasets import ImageFileDataset
from .errors import DataConfigError
from .files import IMAGE_EXTENSIONS, find_images, scan_classes
from .splits import RawSplits


def scan_samples(split_dir: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image of every class folder; an empty class folder is an error."""
    samples = []
    for target, name in enumerate(classes):
        paths = find_images(os.path.join(split_dir, name))
        if not paths:
            raise DataConfigError(
                f"class folder {os.path.join(split_dir, name)!r} has no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
        samples.extend((path, target) for path in paths)
    return samples


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders: ``root/train/<class>/*``, ``root/val`` (else a seeded ``val_fraction`` split
    of train) and optionally ``root/test``, all with train's class list.

    ``transform_style``: ``imagenet`` (RandomResizedCrop(image_size); eval Resize(resize_size) +
    CenterCrop(image_size), resize_size defaulting to image_size * 256/224) or ``cifar`` (pad-4 random
    crop + flip at ``image_size``, e.g. 32 for CIFAR JPEGs).

    Undecodable files raise an error naming the file; with ``skip_corrupt`` they are replaced by the next
    decodable sample and counted in :attr:`corrupt_skipped`.

    Args:
        root: Folder holding ``train/`` (and optionally ``val/`` and ``test/``).
        transform_style: ``imagenet`` or ``cifar`` transforms.
        image_size: Side of the (square) images the network sees.
        resize_size: Eval resize before the center crop (default: ``image_size * 256/224`` for ``imagenet``).
        skip_corrupt: Replace undecodable images by the next decodable one instead of failing (``predict``: leave
            them out and list them).
        val_fraction: Seeded share of train held out for validation when there is no ``val/`` folder.
    """

    def __init__(
        self,
        root: str,
        transform_style: Literal["imagenet", "cifar"] = "imagenet",
        image_size: int = 224,
        resize_size: int | None = None,
        skip_corrupt: bool = False,
        val_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        if resize_size is None:
            resize_size = round(image_size * 256 / 224) if transform_style == "imagenet" else image_size
        super().__init__(
            val_fraction=val_fraction,
            transform_style=transform_style,
            crop_size=image_size,
            resize_size=resize_size,
            skip_corrupt=skip_corrupt,
            **kwargs,
        )
        self.root = root
        self._classes: list[str] | None = None

    def _split_dir(self, split: str) -> str:
        return os.path.join(self.root, split)

    @property
    def class_names(self) -> list[str]:
        if self._classes is None:
            if not os.path.isdir(self.root):
                raise DataConfigError(f"ImageFolder root {self.root!r} does not exist; set data.root")
            train_dir = self._split_dir("train")
            if not os.path.isdir(train_dir):
                raise DataConfigError(f"no train folder {train_dir!r}; expected {self.root}/train/<class>/<images>")
            classes = scan_classes(train_dir)
            if not classes:
                raise DataConfigError(f"{train_dir!r} has no class sub-folders; expected train/<class>/<images>")
            self._classes = classes
        return list(self._classes)

    def _dataset(self, split: str) -> ImageFileDataset | None:
        split_dir = self._split_dir(split)
        if not os.path.isdir(split_dir):
            return None
        classes = self.class_names
        if split != "train":
            found = scan_classes(split_dir)
            if found != classes:
                missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
                raise DataConfigError(
                    f"class folders of {split_dir!r} differ from train's: missing {missing}, extra {extra}; "
                    "make them match"
                )
        return ImageFileDataset(
            scan_samples(split_dir, classes),
            mode=self.image_mode,
            skip_corrupt=self.skip_corrupt,
            counter=self.corrupt_counter,
        )

    def load_splits(self) -> RawSplits:
        self.class_names  # noqa: B018 -- validates root and root/train with clear errors
        train = self._dataset("train")
        assert train is not None
        return RawSplits(train=train, val=self._dataset("val"), test=self._dataset("test"))
