"""Lightning callbacks that resnet-lit adds to the Trainer."""

from resnet_lit.callbacks.prediction_writer import PredictionCSVWriter

__all__ = ["PredictionCSVWriter"]
