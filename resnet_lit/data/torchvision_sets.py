"""CIFAR-10/100 from torchvision's pickle batches (``<data_dir>/cifar-10-batches-py`` etc.)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import datasets

from .base import ImageDataModule, LoaderKind, RawSplits
from .transforms import Augment

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# fmt: off
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck",
    "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]
# fmt: on


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 with CIFAR-style augmentation (pad-4 random crop + horizontal flip).

    Validation: with ``val_fraction == 0`` (default) the official test set doubles as the validation set
    (the usual CIFAR recipe); with ``val_fraction > 0`` a seeded held-out part of the training set is used.
    Test is always the official test set. ``download`` fetches the archive in ``prepare_data`` (rank 0).
    """

    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)
    dataset_cls: type[datasets.CIFAR10] = datasets.CIFAR10
    num_fine_classes = 10

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        image_size: int = 32,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        val_fraction: float = 0.0,
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
            transform_style="cifar",
            crop_size=image_size,
            resize_size=image_size,
            loader=loader,
        )
        self.data_dir = data_dir
        self.download = download

    @property
    def num_classes(self) -> int:
        return self.num_fine_classes

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR10_CLASSES)

    def prepare_data(self) -> None:
        if self.download:
            self.dataset_cls(self.data_dir, train=True, download=True)
            self.dataset_cls(self.data_dir, train=False, download=True)

    def _load(self, train: bool) -> datasets.CIFAR10:
        try:
            return self.dataset_cls(self.data_dir, train=train, download=False)
        except RuntimeError as error:
            raise RuntimeError(
                f"{self.dataset_cls.__name__} not found or corrupted under data_dir={self.data_dir!r} "
                f"(expected {self.dataset_cls.base_folder}/); set download: true or fix data_dir"
            ) from error

    def load_splits(self) -> RawSplits:
        train, test = self._load(True), self._load(False)
        return RawSplits(train=train, val=test if self.val_fraction == 0 else None, test=test)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels), same recipe and arguments as :class:`CIFAR10DataModule`."""

    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)
    dataset_cls = datasets.CIFAR100
    num_fine_classes = 100

    @property
    def class_names(self) -> list[str]:
        return list(CIFAR100_CLASSES)
