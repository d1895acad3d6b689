"""MNIST and Fashion-MNIST from torchvision's idx files (``<data_dir>/MNIST/raw`` etc.), 1 channel."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import datasets

from .base import ImageDataModule, LoaderKind, RawSplits
from .transforms import Augment

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip


class MNISTDataModule(ImageDataModule):
    """MNIST, 28x28 grayscale; ``image_size`` resizes (the d2l recipe uses 96). No crop/flip augmentation.

    Validation is a seeded ``val_fraction`` hold-out of the training set (default 1/12, i.e. 5000 images);
    with ``val_fraction == 0`` the official test set is used for validation. Test is the official test set.
    """

    default_mean = (0.1307,)
    default_std = (0.3081,)
    dataset_cls: type[datasets.MNIST] = datasets.MNIST

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        image_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        val_fraction: float = 1 / 12,
        seed: int = 0,
        augment: Augment = "none",
        random_erasing: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
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
            val_fraction=val_fraction,
            seed=seed,
            augment=augment,
            random_erasing=random_erasing,
            mean=mean,
            std=std,
            predict_dir=predict_dir,
            transform_style="plain",
            crop_size=image_size,
            resize_size=image_size,
            loader=loader,
        )
        self.data_dir = data_dir
        self.download = download

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def in_channels(self) -> int:
        return 1

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def prepare_data(self) -> None:
        if self.download:
            self.dataset_cls(self.data_dir, train=True, download=True)
            self.dataset_cls(self.data_dir, train=False, download=True)

    def _load(self, train: bool) -> datasets.MNIST:
        try:
            return self.dataset_cls(self.data_dir, train=train, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.dataset_cls.__name__} not found under data_dir={self.data_dir!r} (expected "
                f"{self.dataset_cls.__name__}/raw/*-ubyte); set download: true or fix data_dir"
            ) from error

    def load_splits(self) -> RawSplits:
        train, test = self._load(True), self._load(False)
        return RawSplits(train=train, val=test if self.val_fraction == 0 else None, test=test)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST; same recipe and arguments as :class:`MNISTDataModule`."""

    default_mean = (0.2860,)
    default_std = (0.3530,)
    dataset_cls = datasets.FashionMNIST

    @property
    def class_names(self) -> list[str]:
        return list(FASHION_CLASSES)
