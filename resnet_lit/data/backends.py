"""The loader back-end, chosen once from ``loader:``: DataLoaders that transform images one by one in workers, or
the in-memory device store that transforms whole batches on the training device. Both draw the same samples in
the same order and resume the same way; the DataModule only talks to the :class:`LoaderBackend` interface.

On the DataLoader path the workers of image files and uint8 datasets stop at uint8 images; both back-ends finish
such batches on the training device after the transfer (:mod:`~resnet_lit.data.finish`), ``predict``'s included.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch.utils.data import Dataset

from .balanced import BalancedTrainSampler
from .class_counts import dataset_targets
from .datasets import SeededTransformDataset
from .device_store import DeviceImageStore
from .errors import DataConfigError
from .finish import BatchFinisher
from .loaders import DeviceEvalLoader, DeviceTrainLoader, IndexBatch, ResumableLoader, SeededDataLoader, TrainDataLoader
from .samplers import EvalShardSampler, ResumableTrainSampler
from .seeds import mix_seed
from .splits import RawSplits
from .transforms import ImagePipeline

LoaderKind = Literal["dataloader", "device"]


@dataclass(frozen=True)
class LoaderSettings:
    """The DataModule's loader knobs (batch sizes are per process)."""

    batch_size: int
    eval_batch_size: int
    num_workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = False
    drop_last: bool = True
    balanced_sampling: bool = False


class Placement(NamedTuple):
    """Where loaders are made: the data seed, this process's rank among ``world_size``, the training device."""

    seed: int
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    def train_sampler(self, train: Dataset, balanced: bool = False) -> ResumableTrainSampler:
        """The train sampler of this rank; ``balanced``: one that draws each class equally often, from the labels
        of ``train`` (read without decoding images, see :func:`~resnet_lit.data.class_counts.dataset_targets`)."""
        shard = {"num_replicas": self.world_size, "rank": self.rank, "seed": self.seed}
        if balanced:
            return BalancedTrainSampler(dataset_targets(train), **shard)
        return ResumableTrainSampler(len(train), **shard)  # type: ignore[arg-type]

    def eval_sampler(self, size: int) -> EvalShardSampler:
        return EvalShardSampler(size, num_replicas=self.world_size, rank=self.rank)


class LoaderBackend(Protocol):
    """Turns splits into what Lightning iterates, and transferred batches into ``(images, targets)``."""

    def setup(self, splits: RawSplits, stage: str | None, validates: bool = True) -> None: ...

    def train_loader(self, splits: RawSplits, place: Placement) -> ResumableLoader: ...

    def eval_loader(self, splits: RawSplits, split: str, place: Placement) -> Iterable[Any]: ...

    def on_after_batch_transfer(self, batch: Any) -> Any: ...


def make_backend(
    kind: LoaderKind, settings: LoaderSettings, pipeline: ImagePipeline, normalize_on_device: bool = True
) -> LoaderBackend:
    """The back-end of ``loader: kind``; a DataConfigError names what ``device`` cannot do (the ``imagenet`` style's
    random resized crops of variable-size images). ``normalize_on_device``:
    the DataLoader workers hand over unnormalised (uint8) images, see :class:`DataLoaderBackend`."""
    if kind == "dataloader":
        return DataLoaderBackend(settings, pipeline, normalize_on_device)
    if kind != "device":
        raise DataConfigError(f"loader must be 'dataloader' or 'device', got {kind!r}")
    refusal = device_path_refusal(pipeline)
    if refusal is not None:
        raise DataConfigError(refusal)
    return DeviceBackend(settings, pipeline)


def device_path_refusal(pipeline: ImagePipeline) -> str | None:
    """Why ``loader: device`` cannot run ``pipeline``'s transforms (a one-line message naming the setting), or None
    if it can. ``loader: device`` fails with it; ``loader: auto`` logs it and takes the DataLoader path."""
    if pipeline.style not in ("cifar", "plain"):
        return (
            f"loader: device supports the 'cifar' and 'plain' transform styles (fixed-size images), not "
            f"{pipeline.style!r}; use loader: dataloader"
        )
    return None  # crop, flip, augment (batch_augment.py) and random erasing all run per batch on the device


def train_drop_last(settings: LoaderSettings, samples: int, place: Placement) -> bool:
    """``drop_last`` of a train loader over ``samples`` per process: also True where the last batch would hold
    a single sample, which BatchNorm cannot normalise in training (the batch is dropped, with a warning)."""
    if settings.drop_last or samples % settings.batch_size != 1:
        return settings.drop_last
    if place.rank == 0:
        warnings.warn(
            f"drop_last: false would leave a last training batch of 1 sample ({samples} samples per process in "
            f"batches of {settings.batch_size}), which BatchNorm cannot train on: that batch is dropped every epoch",
            stacklevel=3,
        )
    return True


def eval_dataloader(
    dataset: Dataset,
    settings: LoaderSettings,
    place: Placement,
    loader_cls: type[SeededDataLoader] = SeededDataLoader,
    **loader_args: Any,
) -> SeededDataLoader:
    """An in-order DataLoader over this rank's shard of ``dataset`` (val, test and predict on the standard path)."""
    sampler = place.eval_sampler(len(dataset))  # type: ignore[arg-type]
    return loader_cls(
        dataset, batch_size=settings.eval_batch_size, sampler=sampler, **_worker_args(settings, place), **loader_args
    )


def _worker_args(settings: LoaderSettings, place: Placement) -> dict[str, Any]:
    return {
        "num_workers": settings.num_workers,
        "pin_memory": settings.pin_memory and torch.cuda.is_available(),
        "persistent_workers": settings.persistent_workers and settings.num_workers > 0,
        "seed": mix_seed(place.seed, place.rank),
    }


class DataLoaderBackend:
    """``loader: dataloader``: torch DataLoaders; each sample is decoded and transformed on its own.

    With ``normalize_on_device`` (image files, uint8 datasets) the workers stop at uint8 images, geometric
    augmentation included, and the batch is converted, normalised, randomly erased and made channels_last on the
    training device; otherwise (float datasets) the workers do all of it.
    """

    def __init__(self, settings: LoaderSettings, pipeline: ImagePipeline, normalize_on_device: bool = True) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.normalize_on_device = normalize_on_device
        self.finish = BatchFinisher(pipeline)

    def setup(self, splits: RawSplits, stage: str | None, validates: bool = True) -> None:
        """Nothing to prepare: samples are read when a batch is drawn."""

    def train_loader(self, splits: RawSplits, place: Placement) -> TrainDataLoader:
        sampler = place.train_sampler(splits.train, self.settings.balanced_sampling)
        raw = self.normalize_on_device
        return TrainDataLoader(
            SeededTransformDataset(splits.train, self.pipeline.train(normalize=not raw), raw=raw),
            batch_size=self.settings.batch_size,
            sampler=sampler,
            drop_last=train_drop_last(self.settings, len(sampler), place),
            **_worker_args(self.settings, place),
        )

    def eval_loader(self, splits: RawSplits, split: str, place: Placement) -> SeededDataLoader:
        raw = self.normalize_on_device
        dataset = SeededTransformDataset(getattr(splits, split), self.pipeline.eval(normalize=not raw), raw=raw)
        return eval_dataloader(dataset, self.settings, place)

    def on_after_batch_transfer(self, batch: Any) -> Any:
        """Finish a batch of raw images on the device it was moved to; other batches pass unchanged."""
        return self.finish(batch)


class DeviceBackend:
    """``loader: device``: index batches into a :class:`DeviceImageStore` of the splits on the training device."""

    def __init__(self, settings: LoaderSettings, pipeline: ImagePipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.finish = BatchFinisher(pipeline)  # predict's batches come from a DataLoader
        self._store: tuple[RawSplits, DeviceImageStore] | None = None

    def store(self, splits: RawSplits) -> DeviceImageStore:
        """The store of ``splits`` (a new one when the DataModule reloaded its splits)."""
        if self._store is None or self._store[0] is not splits:
            self._store = (splits, DeviceImageStore.from_splits(splits, self.pipeline, self.settings.num_workers))
        return self._store[1]

    def setup(self, splits: RawSplits, stage: str | None, validates: bool = True) -> None:
        """For ``fit``: decode the train images now, with the rest of the set-up, not in the first step, and the
        val images unless the fit never validates (``trainer.limit_val_batches: 0``)."""
        store = self.store(splits)
        if stage == "fit":
            for name in ("train", "val") if validates else ("train",):
                if name in store.split_names:
                    store.cpu(name)

    def train_loader(self, splits: RawSplits, place: Placement) -> DeviceTrainLoader:
        self.store(splits)
        sampler = place.train_sampler(splits.train, self.settings.balanced_sampling)
        drop_last = train_drop_last(self.settings, len(sampler), place)
        return DeviceTrainLoader(sampler, self.settings.batch_size, drop_last, device=place.device)

    def eval_loader(self, splits: RawSplits, split: str, place: Placement) -> DeviceEvalLoader:
        self.store(splits)
        sampler = place.eval_sampler(len(getattr(splits, split)))
        return DeviceEvalLoader(sampler, self.settings.eval_batch_size, split, device=place.device)

    def on_after_batch_transfer(self, batch: Any) -> Any:
        """Gather, augment and normalise an index batch on the device it was moved to (and finish predict's)."""
        if not isinstance(batch, IndexBatch):
            return self.finish(batch)
        assert self._store is not None, "index batches come from loaders of this back-end, which build the store"
        return self._store[1].materialize(batch)
