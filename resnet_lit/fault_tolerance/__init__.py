"""Fault tolerance: what lets a run survive kills, preemption, bad data and bad steps, and resume exactly."""

from resnet_lit.fault_tolerance.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CheckpointReadError,
    CheckpointWriteError,
    read_checkpoint,
)
from resnet_lit.fault_tolerance.checkpointing import ResumableCheckpoint
from resnet_lit.fault_tolerance.cluster import ClusterConfigError, check_launch, explain_launch_errors
from resnet_lit.fault_tolerance.corrupt_images import CorruptImageReport
from resnet_lit.fault_tolerance.csv_logger import ResumableCSVLogger
from resnet_lit.fault_tolerance.install import fault_tolerance_callbacks, with_atomic_checkpoint_io
from resnet_lit.fault_tolerance.nonfinite import NonFiniteLossError, NonFiniteLossPolicy, NonFiniteStateError
from resnet_lit.fault_tolerance.preemption import Preempted, PreemptionHandler
from resnet_lit.fault_tolerance.rng_state import RankStateCheckpoint
from resnet_lit.fault_tolerance.run_lock import RunFolderBusyError, RunFolderError, RunFolderLock

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "CheckpointWriteError",
    "ClusterConfigError",
    "CorruptImageReport",
    "NonFiniteLossError",
    "NonFiniteLossPolicy",
    "NonFiniteStateError",
    "Preempted",
    "PreemptionHandler",
    "RankStateCheckpoint",
    "ResumableCSVLogger",
    "ResumableCheckpoint",
    "RunFolderBusyError",
    "RunFolderError",
    "RunFolderLock",
    "check_launch",
    "explain_launch_errors",
    "fault_tolerance_callbacks",
    "read_checkpoint",
    "with_atomic_checkpoint_io",
]
