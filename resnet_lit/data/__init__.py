"""Data layer: LightningDataModules with distributed-aware, resumable, seeded sampling."""

from .base import ImageDataModule, RawSplits
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .datasets import CorruptCounter, ImageFileDataset, PredictFolderDataset, SeededTransformDataset
from .digits import DigitsDataModule
from .errors import CorruptImageError, DataConfigError
from .folder import ImageFolderDataModule
from .mnist import FashionMNISTDataModule, MNISTDataModule
from .samplers import EvalShardSampler, ResumableTrainSampler
from .synthetic import SyntheticDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CorruptCounter",
    "CorruptImageError",
    "DataConfigError",
    "DigitsDataModule",
    "EvalShardSampler",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "PredictFolderDataset",
    "RawSplits",
    "ResumableTrainSampler",
    "SeededTransformDataset",
    "SyntheticDataModule",
]
