"""Lightning callbacks that resnet-lit adds to the Trainer."""

from resnet_lit.callbacks.checkpointing import ResumableCheckpoint
from resnet_lit.callbacks.data_faults import CorruptImageReport
from resnet_lit.callbacks.defaults import install_fault_tolerance
from resnet_lit.callbacks.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from resnet_lit.callbacks.prediction_writer import PredictionCSVWriter
from resnet_lit.callbacks.preemption import Preempted, PreemptionHandler
from resnet_lit.callbacks.rng_state import RankStateCheckpoint

__all__ = [
    "CorruptImageReport",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "PredictionCSVWriter",
    "Preempted",
    "PreemptionHandler",
    "RankStateCheckpoint",
    "ResumableCheckpoint",
    "install_fault_tolerance",
]
