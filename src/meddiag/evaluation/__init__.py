"""Stage 4: metrics, plots and the evaluation of trained runs."""

from meddiag.lazy import lazy_exports

_EXPORTS = {
    "evaluate_run": "meddiag.evaluation.evaluate",
    "summary_line": "meddiag.evaluation.evaluate",
    "classification_metrics": "meddiag.evaluation.metrics",
    "confusion_matrix": "meddiag.evaluation.metrics",
    "predict_labels": "meddiag.evaluation.metrics",
    "roc_auc": "meddiag.evaluation.metrics",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
