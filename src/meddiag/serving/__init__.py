"""Stage 6: using a trained model on new images."""

from meddiag.serving.predictor import Failure, Prediction, Predictor, collect_image_files, write_predictions_csv

__all__ = ["Failure", "Prediction", "Predictor", "collect_image_files", "write_predictions_csv"]
