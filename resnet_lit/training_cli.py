"""`ResNetLitCLI`: the LightningCLI behind `resnet-lit fit/validate/test/predict`, with the run layout and the
fault-tolerance pieces as Trainer defaults. The benchmarks build their `fit` runs with it too."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from resnet_lit.callbacks import PerClassReport, PredictionCSVWriter
from resnet_lit.callbacks.progress_bar import ThrottledProgressBar
from resnet_lit.cli_checkpoint import checkpoint_file, saved_hyperparameters, unset_hyperparameters, warn_unsafe_load
from resnet_lit.cli_parser import ResNetLitArgumentParser
from resnet_lit.data import ImageDataModule
from resnet_lit.export.exporter import ExportResult, RunRecord
from resnet_lit.fault_tolerance import (
    ResumableCheckpoint,
    check_launch,
    explain_launch_errors,
    fault_tolerance_callbacks,
    with_atomic_checkpoint_io,
)
from resnet_lit.fault_tolerance.install import ATOMIC_CHECKPOINT_IO, configures
from resnet_lit.models import ResidualBlock
from resnet_lit.module import ResNetClassifier
from resnet_lit.trainer import ResNetLitTrainer

CHECKPOINT_SUBDIR = "checkpoints"


class ResNetLitCLI(LightningCLI):
    """LightningCLI wired for the zoo: data->model links, a fixed checkpoint folder, CSV logging, and the
    fault-tolerance callbacks and atomic checkpoint writes as `trainer_defaults` (a configured callback of the
    same class, or a configured CheckpointIO plugin, takes their place).

    With `--ckpt_path`, a model option is taken from (lowest first) its default, the checkpoint's saved
    hyperparameters, the config files, the command line.

    Layout of a run, for `trainer.default_root_dir: D`:
        D/config.yaml              the resolved config, written once the run has started (rewritten by a
                                   resumed run, untouched by one that fails before it starts)
        D/metrics.csv              CSVLogger output (appended by a resumed run)
        D/checkpoints/last.ckpt    always the newest state; `--ckpt_path last` resumes from it
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            # The classes that the config instantiates; `data:` names a subclass of ImageDataModule.
            model_class=ResNetClassifier, datamodule_class=ImageDataModule, trainer_class=ResNetLitTrainer,
            subclass_mode_data=True,
            save_config_callback=SaveConfigOnStart,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "use_distributed_sampler": False,
                "callbacks": fault_tolerance_callbacks(),
                "plugins": [{"class_path": ATOMIC_CHECKPOINT_IO}],
            },
            seed_everything_default=0,
            parser_kwargs={"prog": "resnet-lit"},
            parser_class=ResNetLitArgumentParser,
            auto_configure_optimizers=False,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands and `export` (`ResNetLitTrainer.export`; the CLI passes `run` itself)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule", "run"}}

    def export(self, **kwargs: Any) -> ExportResult:
        """`trainer.export`, told the config files and the data section for the model card."""
        config = self.config["export"]
        recipe = [os.fspath(path) for path in (config.get("config") or []) if path is not None]
        data = config.get("data")
        data = data.as_dict() if isinstance(data, Namespace) else dict(data or {})
        return self.trainer.export(**kwargs, run=RunRecord(recipe=recipe, data=data))

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._args = args  # parsed again, without defaults, to tell what the user set (`_parse_ckpt_path`)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Fill the model options nobody set from the `--ckpt_path` checkpoint (`last` included).

        Replaces Lightning's private hook of the same name, which parses the saved hyperparameters over the
        config files and the command line (tests/test_failures_cli.py pins that the hook still exists).
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = checkpoint_file(config.get("ckpt_path"), _checkpoint_dir(config))
        if path is None:
            return
        weights_only = config.get("weights_only") is not False
        if not weights_only:
            warn_unsafe_load(path)
        saved = saved_hyperparameters(path, weights_only)
        explicit = self._explicit_config().get(f"{subcommand}.model") or Namespace()
        fill = unset_hyperparameters(saved, config.model, explicit)
        if not fill:
            return
        try:
            self.config = self.parser.parse_object({subcommand: {"model": fill}}, self.config)
        except SystemExit:  # the parser has printed the error; say where the value came from
            print(f"resnet-lit: that value is a hyperparameter saved in {path}; set the key yourself", file=sys.stderr)
            raise

    def _explicit_config(self) -> Namespace:
        """What the config files and the command line set, without defaults."""
        if isinstance(self._args, dict | Namespace):
            return self.parser.parse_object(self._args, defaults=False)
        return self.parser.parse_args(self._args, defaults=False)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("num_classes", "in_channels", "class_names"):
            parser.link_arguments(f"data.{key}", f"model.{key}", apply_on="instantiate")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.save_last": True,
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.filename": "epoch{epoch:03d}-step{step}",
            "checkpoint.auto_insert_metric_name": False,
        })  # fmt: skip
        parser.add_lightning_class_args(PredictionCSVWriter, "prediction_writer")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or os.getcwd()
        config.trainer.default_root_dir = root
        if "weights_only" in config and config.weights_only is None:
            config.weights_only = True  # never unpickle arbitrary objects from a --ckpt_path file
        config.checkpoint.dirpath = _checkpoint_dir(config)
        if config.trainer.sync_batchnorm and not _runs_on_gpu(config.trainer.accelerator):
            rank_zero_warn(
                "resnet-lit: trainer.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm is GPU-only); "
                "training on CPU with per-process BatchNorm instead"
            )
            config.trainer.sync_batchnorm = False
        if config.trainer.use_distributed_sampler:
            rank_zero_warn(
                "resnet-lit: trainer.use_distributed_sampler is ignored: the DataModules shard the data themselves "
                "(Lightning's sampler would re-shard them and pad evaluation with duplicate samples)"
            )
            config.trainer.use_distributed_sampler = False
        if self.subcommand == "export":
            config.trainer.logger = False  # export logs no metrics: leave the run's metrics.csv as it is
            config.model.compile = False  # the exporters trace the plain network
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="resnet_lit.fault_tolerance.ResumableCSVLogger",
                init_args=Namespace(save_dir=root, name="", version="", append=self._appends_metrics(config)),
            )
        self.trainer_defaults["callbacks"] = [
            *fault_tolerance_callbacks(config.trainer.callbacks),
            *default_progress_bar(config.trainer),
            *([] if configures(config.trainer.callbacks, PerClassReport) else [PerClassReport()]),
        ]
        config.trainer.plugins = with_atomic_checkpoint_io(config.trainer.plugins)

    def after_instantiate_classes(self) -> None:
        warn_if_images_vanish(self.datamodule, getattr(self.model, "net", None))
        check_shards = getattr(self.datamodule, "check_shards", None)
        if self.subcommand is not None and check_shards is not None:
            check_shards(self.trainer, self.subcommand)  # once, before Lightning's launcher starts the processes

    def _appends_metrics(self, config: Namespace) -> bool:
        """Whether metrics.csv is continued rather than replaced: by a `fit` that restores a checkpoint, and by
        `validate`/`test`/`predict`, which must not erase the training history of the run folder they log to."""
        if self.subcommand != "fit":
            return True
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            folder = config.checkpoint.dirpath
            return os.path.isdir(folder) and any(
                n.startswith("last") and n.endswith(".ckpt") for n in os.listdir(folder)
            )
        return bool(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        # Lightning validates SLURM/torchrun settings only when the run starts: check them now, with a hint.
        with explain_launch_errors():
            trainer = super().instantiate_trainer(**kwargs)
        check_launch(trainer)
        return trainer

    def fit(self, model: LightningModule, ckpt_path: str | None = None, **kwargs: Any) -> None:
        """`trainer.fit`. `--ckpt_path last` before the first checkpoint exists starts a new run, as it should
        (the SLURM script always passes it), so Lightning's warning about it is left out, for this call only."""
        with warnings.catch_warnings():
            if ckpt_path == "last":
                warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last')
            self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


class SaveConfigOnStart(SaveConfigCallback):
    """Writes `config.yaml` once the run has really started (the checkpoint restored, the training, evaluation
    or prediction loop begun), so that a run that fails before, e.g. a rejected resume, leaves the run's
    config as it was. Lightning's callback writes it in `setup`, before the checkpoint is loaded."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not the validation inside `fit`
            super().setup(trainer, pl_module, "validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "predict")


def default_progress_bar(trainer_config: Namespace) -> list[Callback]:
    """`[ThrottledProgressBar()]`, unless the config turns the progress bar off or brings its own."""
    if trainer_config.get("enable_progress_bar") is False or configures(trainer_config.get("callbacks"), ProgressBar):
        return []
    return [ThrottledProgressBar()]


def network_stride(net: nn.Module) -> int | None:
    """How much a zoo network downsamples its input: the stem's stride times every block's; None if the
    network has no recorded stem stride (a network from a custom factory)."""
    stem_stride = getattr(getattr(net, "stem", None), "stride", None)
    if not isinstance(stem_stride, int):
        return None
    return stem_stride * math.prod(m.stride for m in net.modules() if isinstance(m, ResidualBlock))


def warn_if_images_vanish(datamodule: object, net: nn.Module | None) -> None:
    """Warn when the data's images are smaller than the network's total stride: the last stages then see a
    single pixel (padding keeps the shapes valid, so training runs, learning little)."""
    side = _image_side(datamodule)
    stride = network_stride(net) if net is not None else None
    if side is not None and stride is not None and side < stride:
        rank_zero_warn(
            f"resnet-lit: the data's {side}x{side} images are smaller than the network's total stride {stride} "
            f"(stem x stage strides), so the last stages see a single pixel; use larger images "
            "(data.init_args.image_size) or smaller strides (model.net.strides, model.net.stem: cifar)"
        )


def _image_side(datamodule: object) -> int | None:
    """The side of the images the network sees, where the DataModule's settings say it (None: unknown)."""
    side = getattr(datamodule, "image_size", None)
    if side is None:
        side = getattr(getattr(datamodule, "pipeline", None), "crop_size", None)
    return side if isinstance(side, int) else None


def _checkpoint_dir(config: Namespace) -> str:
    """`checkpoint.dirpath`, by default `<trainer.default_root_dir>/checkpoints`."""
    if config.checkpoint.dirpath is not None:
        return config.checkpoint.dirpath
    return os.path.join(config.trainer.default_root_dir or os.getcwd(), CHECKPOINT_SUBDIR)


def _runs_on_gpu(accelerator: object) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()
