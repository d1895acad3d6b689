"""The `resnet-lit` command: the zoo's inspection commands plus a LightningCLI for fit/validate/test/predict."""

from __future__ import annotations

import itertools
import os
import pickle
import sys
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from resnet_lit.callbacks import PredictionCSVWriter
from resnet_lit.commands import ZOO_COMMANDS, run_zoo_command
from resnet_lit.data import ImageDataModule
from resnet_lit.data.errors import CorruptImageError, DataConfigError
from resnet_lit.fault_tolerance import NonFiniteLossError, ResumableCheckpoint, install_fault_tolerance
from resnet_lit.fault_tolerance.checkpoint_io import CheckpointMismatchError
from resnet_lit.fault_tolerance.cluster import ClusterConfigError, check_launch, explain_launch_errors
from resnet_lit.module import ResNetClassifier
from resnet_lit.registry import RegistryError

CHECKPOINT_SUBDIR = "checkpoints"


class ResNetLitCLI(LightningCLI):
    """LightningCLI wired for the zoo: data->model links, a fixed checkpoint folder and CSV logging.

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
            trainer_defaults={"use_distributed_sampler": False},
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
        install_fault_tolerance(trainer)  # exact resume, preemption, corrupt-image report, atomic writes
        return trainer


def _runs_on_gpu(accelerator: object) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def _check_yaml_files(argv: list[str]) -> None:
    """Fail fast, naming the file, on a `--config` that is not valid YAML (jsonargparse hides the name)."""
    for flag, path in itertools.pairwise(argv):
        if flag not in ("--config", "-c") or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise SystemExit(f"resnet-lit: error: {path} is not valid YAML: {err}") from None


def _run_cli(args: list[str] | None) -> None:
    """Run the LightningCLI, then close the process group so no gloo/NCCL thread outlives the interpreter
    (under torchrun an open group can abort the worker at exit after a successful run)."""
    try:
        ResNetLitCLI(args=args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of `resnet-lit` and `python -m resnet_lit`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ZOO_COMMANDS:
        try:
            code = run_zoo_command(argv)
        except (RegistryError, ValueError) as err:
            raise SystemExit(f"resnet-lit {argv[0]}: error: {err}") from None
        if code:
            raise SystemExit(code)
        return
    _check_yaml_files(argv)
    try:
        _run_cli(argv if args is not None else None)
    except (RegistryError, DataConfigError, ClusterConfigError, NonFiniteLossError, CheckpointMismatchError) as err:
        raise SystemExit(f"resnet-lit: error: {err}") from None
    except CorruptImageError as err:
        raise SystemExit(f"resnet-lit: error: {_original_message(err)}") from None
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SystemExit(
            f"resnet-lit: error: refusing to load a checkpoint that needs arbitrary unpickling ({first})"
        ) from None


def _original_message(err: BaseException) -> str:
    """The message of an exception re-raised from a DataLoader worker, without the worker's traceback."""
    message = str(err)
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(prefix) :] if last.startswith(prefix) else last
