"""Stage 6: diagnosing new files (predictor), ONNX export, and the REST service with its web page."""

from meddiag.data.collect import Failure
from meddiag.serving.predictor import Prediction, Predictor, write_predictions_csv

__all__ = ["Failure", "Prediction", "Predictor", "write_predictions_csv"]
