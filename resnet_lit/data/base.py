"""Shared base DataModule: splits, transforms, samplers, DataLoaders and mid-epoch resume state."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import CorruptCounter, PredictFolderDataset, SeededTransformDataset
from .device_loader import (
    DeviceEvalLoader,
    DeviceImageStore,
    DeviceTrainLoader,
    IndexBatch,
    dataset_tensors,
    deterministic_geometry,
)
from .errors import DataConfigError
from .samplers import EvalShardSampler, ResumableTrainSampler, mix_seed
from .transforms import Augment, TransformStyle, build_eval_transform, build_train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LoaderKind = Literal["dataloader", "device"]


@dataclass
class RawSplits:
    """Untransformed datasets yielding ``(PIL image or tensor, int target)``; ``None`` when a split is absent."""

    train: Dataset
    val: Dataset | None
    test: Dataset | None


def split_indices(size: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (seeded) ``(train, val)`` index split of ``range(size)``, each sorted."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    num_val = round(size * val_fraction)
    generator = torch.Generator().manual_seed(mix_seed(seed, 0x5B1))  # own stream, independent of shuffling
    order = torch.randperm(size, generator=generator).tolist()
    return sorted(order[num_val:]), sorted(order[:num_val])


class SeededDataLoader(DataLoader):
    """A DataLoader that never draws from the global torch RNG and seeds its workers deterministically.

    A plain DataLoader draws its workers' base seed from the global torch RNG each time an iterator is
    created, so a resumed run (which creates iterators at other moments) would continue with a different
    random stream. Here the base seed comes from a private generator reseeded from ``(seed, epoch)`` at
    every iterator, ``epoch`` being the sampler's upcoming epoch (0 for samplers without one); Lightning's
    worker_init_fn derives each worker's torch/numpy/python seeds from that base seed and the ranks.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self.seed = seed

    def __iter__(self) -> Any:
        self.generator.manual_seed(mix_seed(self.seed, getattr(self.sampler, "next_epoch", 0)))
        return super().__iter__()


class ImageDataModule(L.LightningDataModule):
    """Base class of every DataModule: subclasses implement :meth:`load_splits` and the three properties.

    Builds its own samplers, so run the Trainer with ``use_distributed_sampler=False``: training uses
    :class:`ResumableTrainSampler` (seeded shuffle, padded shards, per-sample augmentation seeds, mid-epoch
    resume through :meth:`state_dict` / :meth:`load_state_dict`), evaluation :class:`EvalShardSampler`
    (every sample exactly once over all ranks). ``batch_size`` is per process.

    ``loader: device`` keeps the whole (uint8) dataset on the training device and crops, flips and normalises
    whole batches there (see :mod:`resnet_lit.data.device_loader`): same order, same resume semantics, same
    batches without augmentation. It needs a dataset that fits in device memory, ``cifar`` or ``plain``
    transforms, and ``augment: none`` / ``random_erasing: 0``.
    """

    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def __init__(
        self,
        *,
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
        transform_style: TransformStyle = "imagenet",
        crop_size: int | None = 224,
        resize_size: int | None = 256,
        loader: LoaderKind = "dataloader",
    ) -> None:
        super().__init__()
        if batch_size <= 0 or (eval_batch_size is not None and eval_batch_size <= 0):
            raise DataConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        if not 0.0 <= random_erasing <= 1.0:
            raise DataConfigError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        _check_loader(loader, transform_style, augment, random_erasing)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.random_erasing = random_erasing
        self.mean = tuple(mean) if mean is not None else self.default_mean
        self.std = tuple(std) if std is not None else self.default_std
        self.predict_dir = predict_dir
        self.transform_style = transform_style
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.loader = loader
        self.corrupt_counter = CorruptCounter()
        self.train_sampler: ResumableTrainSampler | None = None
        self._splits: RawSplits | None = None
        self._pending_resume: tuple[int, int] | None = None  # (epoch, batches done) from load_state_dict
        self._device_store: tuple[RawSplits, int, DeviceImageStore] | None = None  # (splits, seed, store)

    # --- what subclasses provide ---------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def load_splits(self) -> RawSplits:
        """Load the untransformed splits. ``val=None`` means: hold out ``val_fraction`` of train."""
        raise NotImplementedError

    # --- derived -------------------------------------------------------------------------------------
    @property
    def image_mode(self) -> str:
        """PIL mode that image files are decoded to."""
        return "L" if self.in_channels == 1 else "RGB"

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt images replaced so far by this process and its DataLoader workers (all splits)."""
        return self.corrupt_counter.value

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_transform(self) -> Any:
        return build_train_transform(
            self.transform_style,
            crop_size=self.crop_size,
            mean=self.mean,
            std=self.std,
            augment=self.augment,
            random_erasing=self.random_erasing,
        )

    def eval_transform(self) -> Any:
        return build_eval_transform(
            self.transform_style, crop_size=self.crop_size, resize_size=self.resize_size, mean=self.mean, std=self.std
        )

    def setup(self, stage: str | None = None) -> None:
        if stage != "predict":
            self.splits()
        if self.loader == "device" and stage == "fit":
            # Decode the training and validation images now, with the rest of the set-up, not in the first step.
            store = self.device_store()
            for name in ("train", "val"):
                if name in store.split_names:
                    store.cpu(name)

    def splits(self) -> RawSplits:
        """The untransformed splits, loaded once; a missing val split is carved out of train here."""
        if self._splits is None:
            splits = self.load_splits()
            if splits.val is None and self.val_fraction > 0:
                train_idx, val_idx = split_indices(len(splits.train), self.val_fraction, self.seed)  # type: ignore[arg-type]
                splits = RawSplits(Subset(splits.train, train_idx), Subset(splits.train, val_idx), splits.test)
            self._splits = splits
        return self._splits

    # --- loaders -------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, sampler: Any, drop_last: bool) -> DataLoader:
        return SeededDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=drop_last,
            seed=mix_seed(self.seed, self.global_rank),
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        sampler = EvalShardSampler(len(dataset), num_replicas=self.world_size, rank=self.global_rank)  # type: ignore[arg-type]
        return self._loader(dataset, self.eval_batch_size, sampler, drop_last=False)

    def train_dataloader(self) -> DataLoader | DeviceTrainLoader:
        train = self.splits().train
        sampler = ResumableTrainSampler(
            len(train), num_replicas=self.world_size, rank=self.global_rank, seed=self.seed  # type: ignore[arg-type]
        )
        if self._pending_resume is not None:
            epoch, batches_done = self._pending_resume
            sampler.resume(epoch, batches_done, self.batch_size)
            self._pending_resume = None
        self.train_sampler = sampler
        if self.loader == "device":
            return DeviceTrainLoader(sampler, self.batch_size, drop_last=self.drop_last, device=self._root_device())
        dataset = SeededTransformDataset(train, self.train_transform())
        return self._loader(dataset, self.batch_size, sampler, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | DeviceEvalLoader | list:
        val = self.splits().val
        if val is None:
            return []  # Lightning skips validation for an empty list
        if self.loader == "device":
            return self._device_eval_loader(val, "val")
        return self._eval_loader(SeededTransformDataset(val, self.eval_transform()))

    def test_dataloader(self) -> DataLoader | DeviceEvalLoader:
        test = self.splits().test
        if test is None:
            raise DataConfigError(f"{type(self).__name__} has no test split configured")
        if self.loader == "device":
            return self._device_eval_loader(test, "test")
        return self._eval_loader(SeededTransformDataset(test, self.eval_transform()))

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dir is None:
            raise DataConfigError("set data.predict_dir to a folder of images to run predict")
        return self._eval_loader(PredictFolderDataset(self.predict_dir, self.eval_transform(), mode=self.image_mode))

    # --- in-memory device path --------------------------------------------------------------------------
    def _device_eval_loader(self, dataset: Dataset, split: str) -> DeviceEvalLoader:
        sampler = EvalShardSampler(len(dataset), num_replicas=self.world_size, rank=self.global_rank)  # type: ignore[arg-type]
        return DeviceEvalLoader(sampler, self.eval_batch_size, split, device=self._root_device())

    def _root_device(self) -> torch.device | None:
        """The training device, where ``loader: device`` creates its index batches (None without a Trainer)."""
        return self.trainer.strategy.root_device if self.trainer is not None else None

    def device_store(self) -> DeviceImageStore:
        """The splits as tensors for ``loader: device``; each split is decoded on first use (see :meth:`setup`)."""
        splits = self.splits()
        if self._device_store is not None and self._device_store[:2] == (splits, self.seed):
            return self._device_store[2]
        built: dict[tuple[int, bool], Any] = {}  # CIFAR's val split is its test split: build it once

        def builder(dataset: Dataset, train: bool) -> Any:
            def build() -> Any:
                key = (id(dataset), train)
                if key not in built:
                    geometric = deterministic_geometry(
                        self.transform_style, crop_size=self.crop_size, resize_size=self.resize_size, train=train
                    )
                    built[key] = dataset_tensors(dataset, geometric, num_workers=self.num_workers)
                return built[key]

            return build

        builders = {
            name: builder(dataset, name == "train")
            for name in ("train", "val", "test")
            if (dataset := getattr(splits, name)) is not None
        }
        store = DeviceImageStore(
            builders,
            mean=self.mean,
            std=self.std,
            seed=self.seed,
            crop_padding=4 if self.transform_style == "cifar" else 0,
            flip=self.transform_style == "cifar",
        )
        self._device_store = (splits, self.seed, store)
        return store

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``loader: device``: gather, augment and normalise an index batch on the device it was moved to."""
        if isinstance(batch, IndexBatch):
            return self.device_store().materialize(batch)
        return batch

    # --- resume ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Seed and training position, stored by Lightning in every checkpoint.

        ``epoch``/``batches_done`` name where the next training batch comes from: mid-epoch that is the
        running epoch and the batches this rank has processed; after a finished epoch, the next epoch and 0.
        """
        state: dict[str, Any] = {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "epoch": 0,
            "batches_done": 0,
        }
        trainer = self.trainer
        if trainer is not None:
            # ready = epochs started; processed = batches whose training_step finished (a checkpoint taken in
            # on_train_batch_end already counts its batch here; Lightning bumps `completed` on restore).
            started_epochs = trainer.fit_loop.epoch_progress.current.ready
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if started_epochs == 0 or done >= trainer.num_training_batches:
                state["epoch"], state["batches_done"] = started_epochs, 0
            else:
                state["epoch"], state["batches_done"] = started_epochs - 1, done
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the seed and arm the train sampler to skip the batches done before the checkpoint."""
        if int(state_dict["seed"]) != self.seed:
            self.seed = int(state_dict["seed"])
            self._splits = None  # the val split depends on the seed
        epoch, done = int(state_dict.get("epoch", 0)), int(state_dict.get("batches_done", 0))
        if done and (state_dict.get("batch_size"), state_dict.get("world_size")) != (
            self.batch_size,
            self.world_size,
        ):
            warnings.warn(
                f"resuming mid-epoch with batch_size/world_size {self.batch_size}/{self.world_size}, but the "
                f"checkpoint used {state_dict.get('batch_size')}/{state_dict.get('world_size')}: the rest of "
                "this epoch will not match the uninterrupted run",
                stacklevel=2,
            )
        self._pending_resume = (epoch, done)
        if self.train_sampler is not None:
            self.train_sampler.seed = self.seed
            self.train_sampler.resume(epoch, done, self.batch_size)
            self._pending_resume = None


def _check_loader(loader: str, transform_style: str, augment: str, random_erasing: float) -> None:
    if loader not in ("dataloader", "device"):
        raise DataConfigError(f"loader must be 'dataloader' or 'device', got {loader!r}")
    if loader == "dataloader":
        return
    if transform_style not in ("cifar", "plain"):
        raise DataConfigError(
            f"loader: device supports the 'cifar' and 'plain' transform styles (fixed-size images), not "
            f"{transform_style!r}; use loader: dataloader"
        )
    if augment != "none" or random_erasing > 0:
        raise DataConfigError(
            "loader: device does crop and flip only; set augment: none and random_erasing: 0, or use "
            "loader: dataloader"
        )
