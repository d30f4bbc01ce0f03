"""Stage 4: metrics, plots and the evaluation of trained runs."""

from meddiag.evaluation.evaluate import evaluate_run, summary_line
from meddiag.evaluation.metrics import classification_metrics, confusion_matrix, predict_labels, roc_auc

__all__ = ["evaluate_run", "summary_line", "classification_metrics", "confusion_matrix", "predict_labels", "roc_auc"]
