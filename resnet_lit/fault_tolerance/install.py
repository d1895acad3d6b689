"""What every resnet-lit Trainer gets for fault tolerance, as LightningCLI `trainer_defaults`, unless configured."""

from __future__ import annotations

import importlib
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

from resnet_lit.fault_tolerance.checkpoint_io import AtomicCheckpointIO
from resnet_lit.fault_tolerance.corrupt_images import CorruptImageReport
from resnet_lit.fault_tolerance.nonfinite import NonFiniteLossPolicy
from resnet_lit.fault_tolerance.preemption import PreemptionHandler
from resnet_lit.fault_tolerance.rng_state import RankStateCheckpoint
from resnet_lit.fault_tolerance.run_lock import RunFolderLock

FAULT_TOLERANCE_CALLBACKS: tuple[type[Callback], ...] = (
    RunFolderLock,  # one live `fit` per run folder; first, so that it locks before the others write
    RankStateCheckpoint,  # exact resume: every rank's RNG and running metric states
    PreemptionHandler,  # SIGTERM / SLURM requeue signal: save at the next step and exit
    CorruptImageReport,  # count and log the corrupt images that `skip_corrupt` replaced
    NonFiniteLossPolicy,  # `model.nonfinite_loss`: stop or skip on a NaN/inf loss
)
ATOMIC_CHECKPOINT_IO = f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__qualname__}"


def fault_tolerance_callbacks(configured: Any = None) -> list[Callback]:
    """New instances of the fault-tolerance callbacks that `configured` (the parsed `trainer.callbacks`) lacks.

    A configured callback of the same class, or of a subclass, replaces the default one.
    """
    return [cls() for cls in FAULT_TOLERANCE_CALLBACKS if not configures(configured, cls)]


def configures(configured: Any, base: type) -> bool:
    """Whether `configured` (the parsed `trainer.callbacks` or `trainer.plugins`) holds a `base`, or a subclass,
    as an instance or a `class_path` entry."""
    present = [cls for cls in map(_class_of, _as_list(configured)) if cls is not None]
    return any(issubclass(cls, base) for cls in present)


def with_atomic_checkpoint_io(configured: Any) -> list[Any]:
    """The parsed `trainer.plugins` with exactly one CheckpointIO: the configured one, else AtomicCheckpointIO."""
    plugins = _as_list(configured)
    checkpoint_io = [p for p in plugins if _is_checkpoint_io(p)]
    custom = [p for p in checkpoint_io if _class_of(p) is not AtomicCheckpointIO]
    if custom:  # a user's CheckpointIO replaces ours
        return [p for p in plugins if not _is_checkpoint_io(p) or p in custom]
    if checkpoint_io:  # ours, once
        return [p for p in plugins if not _is_checkpoint_io(p) or p is checkpoint_io[0]]
    return [*plugins, Namespace(class_path=ATOMIC_CHECKPOINT_IO)]


def _as_list(configured: Any) -> list[Any]:
    if configured is None:
        return []
    return list(configured) if isinstance(configured, list | tuple) else [configured]


def _class_of(entry: Any) -> type | None:
    """The class of a parsed `class_path` entry or of an instance; None for other values (plugin names)."""
    if isinstance(entry, Namespace | dict):
        class_path = entry.get("class_path")
        if not class_path:
            return None
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name, None) if module else None
    return None if isinstance(entry, str) else type(entry)


def _is_checkpoint_io(entry: Any) -> bool:
    cls = _class_of(entry)
    return cls is not None and issubclass(cls, CheckpointIO)
