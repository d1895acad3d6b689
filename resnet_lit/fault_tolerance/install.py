"""The fault-tolerance pieces the resnet-lit CLI adds to every Trainer."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from resnet_lit.fault_tolerance.checkpoint_io import AtomicCheckpointIO
from resnet_lit.fault_tolerance.corrupt_images import CorruptImageReport
from resnet_lit.fault_tolerance.preemption import PreemptionHandler
from resnet_lit.fault_tolerance.rng_state import RankStateCheckpoint


def install_fault_tolerance(trainer: pl.Trainer) -> None:
    """Add RankStateCheckpoint, PreemptionHandler and CorruptImageReport (unless configured already), ahead
    of the checkpoint callbacks, and write checkpoints with AtomicCheckpointIO unless a custom CheckpointIO
    plugin was configured."""
    present = {type(cb) for cb in trainer.callbacks}
    missing = [cls() for cls in (RankStateCheckpoint, PreemptionHandler, CorruptImageReport) if cls not in present]
    first_checkpoint = next((i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)), None)
    index = len(trainer.callbacks) if first_checkpoint is None else first_checkpoint
    trainer.callbacks[index:index] = missing
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    # The resnet-lit DataModules resume mid-epoch themselves (ImageDataModule.state_dict): Lightning's
    # warning that the DataLoader is not resumable does not apply.
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # `--ckpt_path last` before the first checkpoint exists starts a new run; save_last is on already.
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
