"""Lightning callbacks for users' configs (the fault-tolerance ones live in `resnet_lit.fault_tolerance`)."""

from resnet_lit.callbacks.gradient_norms import GradientNormMonitor
from resnet_lit.callbacks.per_class_report import PerClassReport
from resnet_lit.callbacks.prediction_writer import PredictionCSVWriter
from resnet_lit.callbacks.progress_bar import ThrottledProgressBar

__all__ = ["GradientNormMonitor", "PerClassReport", "PredictionCSVWriter", "ThrottledProgressBar"]
