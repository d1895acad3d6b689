"""ImageDataModule, the base of every DataModule: it declares the shared loader knobs once, loads and holds the
splits, and hands loading to the back-end that ``loader`` chose. Subclasses add their own arguments, forward the
rest with ``**kwargs`` (jsonargparse lists them all in ``--data.help``) and implement :meth:`load_splits`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .backends import DeviceBackend, LoaderBackend, LoaderKind, LoaderSettings, Placement, make_backend
from .balanced import BalancedTrainSampler, report_balance
from .class_counts import class_counts
from .datasets import CorruptCounter
from .errors import DataConfigError, require_positive
from .eval_shards import check_eval_shards
from .loader_choice import LOADER_SETTINGS, LoaderChoice, LoaderSetting, choose_loader
from .loaders import ResumableLoader
from .predict import PredictDataLoader, PredictFolderDataset, predict_dataloader, warn_predict_skipped
from .samplers import ResumableTrainSampler
from .splits import RawSplits, hold_out_val
from .transforms import Augment, ImagePipeline, TransformStyle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataModule(L.LightningDataModule):
    """Base class of every DataModule: subclasses set :attr:`in_channels` and implement :attr:`class_names` and
    :meth:`load_splits`.

    Builds its own samplers, so run the Trainer with ``use_distributed_sampler=False``: training draws a seeded,
    padded shard per rank with per-sample augmentation seeds, evaluation sees every sample exactly once over all
    ranks. The train loader carries its resume position in Lightning's checkpoints (see
    :class:`~resnet_lit.data.loaders.ResumableLoader`); :meth:`state_dict` adds the seed and keeps a copy of it.

    Args:
        batch_size: Training batch size per process.
        eval_batch_size: Batch size of validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (CUDA only).
        persistent_workers: Keep the workers between epochs.
        drop_last: Drop the last incomplete training batch. A last batch of one sample is dropped anyway (BatchNorm
            cannot train on it), with a warning.
        balanced_sampling: Draw every class of the training split equally often (±1) in each epoch, which stays as
            long as the dataset: a large class gives a random subset, a small one repeats its samples (each repeat
            augmented on its own). Seeded per epoch, the same on every process, exact on resume. Classes without a
            training sample are left out, with a warning. Use it instead of ``model.class_weights: balanced``, not
            with it (that would correct for the imbalance twice).
        val_fraction: Seeded share of train held out for validation where the dataset has no val split.
        seed: Seed of the val split, the shuffling and the per-sample augmentation.
        augment: Extra augmentation policy after the geometric one.
        random_erasing: Probability of random erasing after normalisation (on the training device for image files and
            uint8 datasets, drawn from each sample's seed).
        mean: Per-channel normalisation mean (default: the dataset's).
        std: Per-channel normalisation std (default: the dataset's).
        predict_dir: Folder of images for ``predict``.
        skip_corrupt: Go on past undecodable image files instead of failing: ``predict`` leaves them out of its
            output and lists them at the end; image-file datasets replace them by the next decodable sample in
            training and evaluation.
        loader: ``dataloader`` (per-sample decoding and geometric transforms in workers, uint8 batches finished on the
            training device), ``device`` (the uint8 dataset on the training device, crop, flip, ``augment`` and erasing
            per batch there, each image from its sample seed; ``cifar``/``plain`` styles) or ``auto``: ``device`` where
            it can run the transforms and the decoded splits fit ``device_memory_fraction``, else ``dataloader``. Rank 0
            decides in ``setup``, every process follows, the choice and its reason are logged, and a resumed fit keeps
            the path of its checkpoint.
        device_memory_fraction: The memory budget of ``loader: auto``: the share of the training device's free memory
            (of the available host memory on CPU, shared by the processes of the host) the decoded splits may use.
        transform_style: Transform pipeline, see :mod:`~resnet_lit.data.transforms`.
        crop_size: Output image size (None: keep the size; ``plain`` only).
        resize_size: Eval resize before the center crop.
    """

    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 3
    # DataLoader path: the workers hand over uint8 images and the training device converts, normalises and erases
    # them (image files, uint8 datasets). Float datasets set False: their workers do all of it, as before.
    normalize_on_device: ClassVar[bool] = True

    def __init__(
        self,
        *,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        drop_last: bool = True,
        balanced_sampling: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
        augment: Augment = "none",
        random_erasing: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        predict_dir: str | None = None,
        skip_corrupt: bool = False,
        loader: LoaderSetting = "auto",
        device_memory_fraction: float = 0.25,
        transform_style: TransformStyle = "imagenet",
        crop_size: int | None = 224,
        resize_size: int | None = 256,
    ) -> None:
        super().__init__()
        require_positive(
            batch_size=batch_size, eval_batch_size=eval_batch_size, image_size=crop_size, resize_size=resize_size
        )
        if num_workers < 0:
            raise DataConfigError(f"num_workers must be 0 or more, got {num_workers}")
        if not 0.0 <= random_erasing <= 1.0:
            raise DataConfigError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if loader not in LOADER_SETTINGS:
            raise DataConfigError(f"loader must be 'auto', 'dataloader' or 'device', got {loader!r}")
        if not 0.0 < device_memory_fraction <= 1.0:
            raise DataConfigError(f"device_memory_fraction must be in (0, 1], got {device_memory_fraction}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.predict_dir = predict_dir
        self.skip_corrupt = skip_corrupt
        self.settings = LoaderSettings(
            batch_size,
            eval_batch_size or batch_size,
            num_workers,
            pin_memory,
            persistent_workers,
            drop_last,
            balanced_sampling,
        )
        self.pipeline = ImagePipeline(
            transform_style,
            crop_size,
            resize_size,
            tuple(mean) if mean is not None else self.default_mean,
            tuple(std) if std is not None else self.default_std,
            augment,
            random_erasing,
        )
        self.loader = loader
        self.device_memory_fraction = device_memory_fraction
        self._loader_choice: LoaderChoice | None = None  # the path of the back-end (for auto: once decided)
        self._loader_shared = False  # auto: rank 0's choice, shared with every process of the trainer
        self._backend: LoaderBackend | None = None  # auto: made on first use, after the path is settled
        self._setup_stage: str | None = None
        if loader != "auto":
            self._loader_choice = LoaderChoice(loader, "set by data.loader")
            self._backend = make_backend(loader, self.settings, self.pipeline, self.normalize_on_device)
        self.corrupt_counter = CorruptCounter()
        self.train_sampler: ResumableTrainSampler | None = None
        self._splits: RawSplits | None = None
        self._train_loader: ResumableLoader | None = None
        self._restored_position: dict[str, Any] | None = None  # from load_state_dict, for the next train loader
        self._predict_dataset: PredictFolderDataset | None = None
        self._balance_reported = False

    # --- what subclasses provide ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def load_splits(self) -> RawSplits:
        """Load the untransformed splits. ``val=None`` means: hold out ``val_fraction`` of train."""
        raise NotImplementedError

    # --- derived -------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_mode(self) -> str:
        """PIL mode that image files are decoded to."""
        return "L" if self.in_channels == 1 else "RGB"

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt images replaced so far by this process and its DataLoader workers (all splits)."""
        return self.corrupt_counter.value

    @property
    def predict_skipped(self) -> list[str]:
        """The undecodable files of this process's ``predict`` shard left out so far (``skip_corrupt``)."""
        return [] if self._predict_dataset is None else self._predict_dataset.skipped_paths()

    def splits(self) -> RawSplits:
        """The untransformed splits, loaded once; a missing val split is carved out of train here."""
        if self._splits is None:
            self._splits = hold_out_val(self.load_splits(), self.val_fraction, self.seed)
        return self._splits

    def class_counts(self) -> list[int]:
        """Samples per class of the training split (after any val hold-out), from the datasets' labels without
        decoding images; e.g. for ``model.class_weights: balanced``."""
        return class_counts(self.splits().train, self.num_classes)

    def _placement(self) -> Placement:
        if self.trainer is None:
            return Placement(self.seed)
        return Placement(
            self.seed, self.trainer.global_rank, self.trainer.world_size, self.trainer.strategy.root_device
        )

    # --- the loader path -------------------------------------------------------------------------------
    @property
    def backend(self) -> LoaderBackend:
        """The loader back-end. With ``loader: auto`` it is made on first use (the first loader), once ``setup`` and a
        checkpoint's restore have settled the path; without a trainer, this process decides here."""
        if self._backend is None:
            if self._loader_choice is None:
                self._loader_choice = self._choose_loader()
            kind = self._loader_choice.kind
            self._backend = make_backend(kind, self.settings, self.pipeline, self.normalize_on_device)
            rank_zero_info(self._loader_choice.message())
            if self._setup_stage not in (None, "predict"):
                self._backend.setup(self.splits(), self._setup_stage, self._fit_validates())
        return self._backend

    @property
    def loader_kind(self) -> LoaderKind:
        """The loader path in use: ``data.loader``, or what ``auto`` chose."""
        return "device" if isinstance(self.backend, DeviceBackend) else "dataloader"

    def _choose_loader(self) -> LoaderChoice:
        """What ``loader: auto`` takes in this process: for the trainer's device and processes per host, else for
        one process on the CPU."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        processes_per_host = trainer.num_devices if trainer is not None else 1
        return choose_loader(self.splits(), self.pipeline, device, self.device_memory_fraction, processes_per_host)

    def _share_loader_choice(self, trainer: L.Trainer) -> None:
        """Rank 0 decides, every process follows. A collective: every process calls it at the same point (``setup``)."""
        mine = self._choose_loader() if trainer.global_rank == 0 else None
        kind, reason = trainer.strategy.broadcast((mine.kind, mine.reason) if mine is not None else None, src=0)
        self._use_loader(LoaderChoice(kind, reason))
        self._loader_shared = True

    def _use_loader(self, choice: LoaderChoice) -> None:
        if self._backend is not None and self._loader_choice is not None and self._loader_choice.kind != choice.kind:
            self._backend = None  # made again on the new path at its first use
        self._loader_choice = choice

    def _keep_checkpoint_loader(self, kind: LoaderKind) -> None:
        """``loader: auto`` resuming a fit: stay on the checkpoint's path, whatever the budget says now."""
        reason = "kept from the checkpoint: a resumed fit stays on its path"
        now = self._loader_choice
        if now is not None and now.kind != kind:
            reason += f"; the budget now would choose {now.kind}: {now.reason}"
        if self._train_loader is not None and now is not None and now.kind != kind:
            rank_zero_warn(
                f"resnet-lit: the checkpoint's data.loader path ({kind}) comes after the train loader was made on "
                f"{now.kind}; training goes on with {now.kind}"
            )
            return
        self._use_loader(LoaderChoice(kind, reason))

    def predict_dataset(self) -> PredictFolderDataset:
        """The image files under ``predict_dir`` (uint8 images, finished on the device), listed once per ``predict``
        run: :meth:`setup` lists them again."""
        if self.predict_dir is None:
            raise DataConfigError("set data.predict_dir to a folder of images to run predict")
        if self._predict_dataset is None:
            self._predict_dataset = PredictFolderDataset(
                self.predict_dir,
                self.pipeline.eval(normalize=False),
                mode=self.image_mode,
                skip_corrupt=self.skip_corrupt,
                raw=True,
            )
        return self._predict_dataset

    def check_shards(self, trainer: L.Trainer, stage: str | None) -> None:
        """Raise a DataConfigError, naming the split and the sizes, when a process of ``trainer`` would get no batch
        of what ``stage`` evaluates or predicts (see :mod:`~resnet_lit.data.eval_shards`). :meth:`setup` runs it on
        every process; a launcher can also run it once before it starts them."""
        noun = "sample"
        if stage == "predict":
            what, size, key = f"predict_dir {self.predict_dir!r}", len(self.predict_dataset()), "limit_predict_batches"
            noun = "image"
        else:
            split = {"fit": "val", "validate": "val", "test": "test"}.get(stage or "")
            dataset = getattr(self.splits(), split) if split is not None else None
            if dataset is None:
                return
            what, size, key = f"the {split} split", len(dataset), f"limit_{split}_batches"
        batch_size = self.settings.eval_batch_size
        check_eval_shards(what, size, trainer.world_size, batch_size, key, getattr(trainer, key), noun)

    # --- Lightning hooks -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._predict_dataset = None  # list predict_dir anew for this run
        if self.trainer is not None:
            self.check_shards(self.trainer, stage)
        self._setup_stage = stage
        if stage == "predict":
            if self._loader_choice is None:  # predict reads predict_dir through its own loader: no store to fill
                self._loader_choice = LoaderChoice("dataloader", "predict reads predict_dir through DataLoader workers")
            return
        if self.loader == "auto" and self.trainer is not None and not self._loader_shared:
            self._share_loader_choice(self.trainer)
        if self._backend is not None:
            self._backend.setup(self.splits(), stage, self._fit_validates())

    def _fit_validates(self) -> bool:
        """False when the trainer never runs validation (``limit_val_batches: 0``): fit need not decode val."""
        return self.trainer is None or self.trainer.limit_val_batches != 0

    def train_dataloader(self) -> ResumableLoader:
        loader = self.backend.train_loader(self.splits(), self._placement())
        if self._restored_position is not None:
            loader.load_state_dict(self._restored_position)
            self._restored_position = None
        self._train_loader, self.train_sampler = loader, loader.sampler
        if isinstance(loader.sampler, BalancedTrainSampler) and not self._balance_reported:
            report_balance(loader.sampler, self.class_names)
            self._balance_reported = True
        return loader

    def val_dataloader(self) -> Any:
        if self.splits().val is None:
            return []  # Lightning skips validation for an empty list
        return self.backend.eval_loader(self.splits(), "val", self._placement())

    def test_dataloader(self) -> Any:
        if self.splits().test is None:
            raise DataConfigError(f"{type(self).__name__} has no test split configured")
        return self.backend.eval_loader(self.splits(), "test", self._placement())

    def predict_dataloader(self) -> PredictDataLoader:
        return predict_dataloader(self.predict_dataset(), self.settings, self._placement())

    def teardown(self, stage: str) -> None:
        if stage == "predict" and self.predict_skipped:
            warn_predict_skipped(self.predict_skipped)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The back-end's batch for the model: uint8 images and index batches become float images here."""
        finished = self.backend.on_after_batch_transfer(batch)
        if finished is batch or self.trainer is None:
            return finished
        # Lightning cast the batch to the precision's input type (bf16-true, 16-true) before the transfer, when it
        # held no float images yet: cast what the back-end made.
        return self.trainer.precision_plugin.convert_input(finished)

    def state_dict(self) -> dict[str, Any]:
        """The seed, batch size and world size of the run, the loader path and the train loader's position."""
        state: dict[str, Any] = {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self._placement().world_size,
        }
        if self._loader_choice is not None:
            state["loader"] = self._loader_choice.kind
        if self._train_loader is not None:
            state.update(self._train_loader.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue with the checkpoint's seed (the val split depends on it) and its train position; with
        ``loader: auto``, a resumed fit also keeps the checkpoint's loader path (augmentation differs between them).

        The train loader is stateful and Lightning restores it, but not when ``trainer.estimated_stepping_batches``
        (the LR schedules read it) built the loader before the checkpoint's loop state was loaded: the position
        would be lost (Lightning issue #20550, pinned by ``tests/test_data_resume.py``). The DataModule's state is
        loaded before any loader is built, so it keeps a copy of the position and hands it to the next train loader.
        """
        if int(state_dict["seed"]) != self.seed:
            self.seed = int(state_dict["seed"])
            self._splits = None
        kind = state_dict.get("loader")
        fitting = self.trainer is None or self.trainer.state.fn == TrainerFn.FITTING
        if self.loader == "auto" and kind in ("dataloader", "device") and fitting:
            self._keep_checkpoint_loader(kind)
        self._restored_position = state_dict if "batches_done" in state_dict else None
        if self._restored_position is not None and self._train_loader is not None:
            self._train_loader.load_state_dict(self._restored_position)  # built before the restore
