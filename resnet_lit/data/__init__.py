"""Data layer: LightningDataModules with distributed-aware, resumable, seeded sampling."""

from .backends import DataLoaderBackend, DeviceBackend, LoaderBackend
from .balanced import BalancedTrainSampler
from .base import ImageDataModule
from .datasets import CorruptCounter, ImageFileDataset, SeededTransformDataset
from .digits import DigitsDataModule
from .errors import CorruptImageError, DataConfigError
from .finish import BatchFinisher, RawImages, SeededRawImages
from .folder import ImageFolderDataModule
from .loaders import ResumableLoader
from .predict import PredictFolderDataset
from .samplers import EvalShardSampler, ResumableTrainSampler
from .splits import RawSplits
from .synthetic import SyntheticDataModule
from .torchvision_sets import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "BalancedTrainSampler",
    "BatchFinisher",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CorruptCounter",
    "CorruptImageError",
    "DataConfigError",
    "DataLoaderBackend",
    "DeviceBackend",
    "DigitsDataModule",
    "EvalShardSampler",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "LoaderBackend",
    "MNISTDataModule",
    "PredictFolderDataset",
    "RawImages",
    "RawSplits",
    "ResumableLoader",
    "ResumableTrainSampler",
    "SeededRawImages",
    "SeededTransformDataset",
    "SyntheticDataModule",
    "TorchvisionDataModule",
]
