"""`ResNetLitCLI`: the LightningCLI behind `resnet-lit fit/validate/test/predict`, with the run layout and the
fault-tolerance pieces as Trainer defaults. The benchmarks build their `fit` runs with it too."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from resnet_lit.callbacks import PredictionCSVWriter
from resnet_lit.data import ImageDataModule
from resnet_lit.fault_tolerance import (
    ResumableCheckpoint,
    check_launch,
    explain_launch_errors,
    fault_tolerance_callbacks,
    with_atomic_checkpoint_io,
)
from resnet_lit.fault_tolerance.install import ATOMIC_CHECKPOINT_IO
from resnet_lit.module import ResNetClassifier

CHECKPOINT_SUBDIR = "checkpoints"


class ResNetLitCLI(LightningCLI):
    """LightningCLI wired for the zoo: data->model links, a fixed checkpoint folder, CSV logging, and the
    fault-tolerance callbacks and atomic checkpoint writes as `trainer_defaults` (a configured callback of the
    same class, or a configured CheckpointIO plugin, takes their place).

    Layout of a run, for `trainer.default_root_dir: D`:
        D/config.yaml              the resolved config (rewritten by a resumed run)
        D/metrics.csv              CSVLogger output (appended by a resumed run)
        D/checkpoints/last.ckpt    always the newest state; `--ckpt_path last` resumes from it
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        super().__init__(
            model_class=ResNetClassifier,
            datamodule_class=ImageDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "use_distributed_sampler": False,
                "callbacks": fault_tolerance_callbacks(),
                "plugins": [{"class_path": ATOMIC_CHECKPOINT_IO}],
            },
            seed_everything_default=0,
            parser_kwargs={"prog": "resnet-lit"},
            auto_configure_optimizers=False,
            args=list(args) if args is not None else None,
            run=run,
            **kwargs,
        )

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
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, CHECKPOINT_SUBDIR)
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
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="resnet_lit.fault_tolerance.ResumableCSVLogger",
                init_args=Namespace(save_dir=root, name="", version="", append=self._resumes(config)),
            )
        self.trainer_defaults["callbacks"] = fault_tolerance_callbacks(config.trainer.callbacks)
        config.trainer.plugins = with_atomic_checkpoint_io(config.trainer.plugins)

    def _resumes(self, config: Namespace) -> bool:
        """Whether this is a `fit` that restores a checkpoint (then metrics.csv is continued, not replaced)."""
        ckpt_path = config.get("ckpt_path") if self.subcommand == "fit" else None
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


def _runs_on_gpu(accelerator: object) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()
