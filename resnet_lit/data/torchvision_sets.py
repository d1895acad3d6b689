"""CIFAR-10/100, MNIST and Fashion-MNIST: torchvision's datasets under ``data_dir``, behind one base."""

from __future__ import annotations

from typing import Any, ClassVar

from torchvision import datasets

from .base import ImageDataModule
from .errors import DataConfigError
from .splits import RawSplits

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

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]  # fmt: skip


class TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset with a train and a test split; ``download`` fetches it in ``prepare_data`` (rank 0).

    Validation: a seeded ``val_fraction`` hold-out of the training set; with ``val_fraction == 0`` the official
    test set doubles as the validation set. Test is always the official test set.

    Args:
        data_dir: Folder holding the dataset in torchvision's layout.
        download: Download the dataset into ``data_dir`` if it is missing.
    """

    dataset_cls: ClassVar[type[datasets.VisionDataset]]
    classes: ClassVar[list[str]]
    layout: ClassVar[str]  # where the files are expected under data_dir, for the error message

    def __init__(self, data_dir: str = "data", download: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.download = download

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_cls(self.data_dir, train=train, download=True)  # type: ignore[call-arg]

    def load_splits(self) -> RawSplits:
        train, test = self._load(True), self._load(False)
        return RawSplits(train=train, val=test if self.val_fraction == 0 else None, test=test)

    def _load(self, train: bool) -> datasets.VisionDataset:
        try:
            return self.dataset_cls(self.data_dir, train=train, download=False)  # type: ignore[call-arg]
        except RuntimeError as error:
            raise DataConfigError(
                f"{self.dataset_cls.__name__} not found or corrupted in the folder data_dir={self.data_dir!r} "
                f"(expected {self.layout} there); set download: true or fix data_dir"
            ) from error


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 with CIFAR-style augmentation (pad-4 random crop + horizontal flip); the test set validates.

    Args:
        image_size: Side of the (square) images the network sees.
    """

    dataset_cls = datasets.CIFAR10
    classes = CIFAR10_CLASSES
    layout = f"{datasets.CIFAR10.base_folder}/"
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)

    def __init__(self, image_size: int = 32, **kwargs: Any) -> None:
        super().__init__(transform_style="cifar", crop_size=image_size, resize_size=image_size, **kwargs)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels), same recipe and arguments as :class:`CIFAR10DataModule`."""

    dataset_cls = datasets.CIFAR100
    classes = CIFAR100_CLASSES
    layout = f"{datasets.CIFAR100.base_folder}/"
    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)


class MNISTDataModule(TorchvisionDataModule):
    """MNIST, 28x28 grayscale; no crop/flip augmentation. Validation holds out 1/12 of train (5000 images).

    Args:
        image_size: Resize to this square side (the d2l recipe uses 96); None keeps 28.
        val_fraction: Seeded share of train held out for validation; 0 validates on the test set.
    """

    dataset_cls = datasets.MNIST
    classes = [str(digit) for digit in range(10)]
    layout = "MNIST/raw/*-ubyte"
    default_mean = (0.1307,)
    default_std = (0.3081,)
    in_channels = 1

    def __init__(self, image_size: int | None = None, val_fraction: float = 1 / 12, **kwargs: Any) -> None:
        super().__init__(
            transform_style="plain", crop_size=image_size, resize_size=image_size, val_fraction=val_fraction, **kwargs
        )


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST; same recipe and arguments as :class:`MNISTDataModule`."""

    dataset_cls = datasets.FashionMNIST
    classes = FASHION_CLASSES
    layout = "FashionMNIST/raw/*-ubyte"
    default_mean = (0.2860,)
    default_std = (0.3530,)
