"""Classification metrics as a clinical study reports them.

``auc`` follows the MedMNIST evaluator: for binary tasks the AUC of the positive-class
score; otherwise the mean of the one-vs-rest AUCs over classes (or labels). ``acc``
uses argmax for multi-class tasks, and the decision threshold on the positive class
(binary) or on each label (multi-label, averaged over labels).
"""

from __future__ import annotations

import math

import numpy as np


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the 0/1 labels ``y_true``.

    Computed as the Mann-Whitney U statistic with average ranks for ties, which equals
    the trapezoidal ROC area. NaN when only one class is present.
    """
    y_true = np.asarray(y_true).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty_like(score)
    # Average ranks (1-based) over runs of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [score.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def predict_labels(probs: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Decisions from probabilities (N, K): class indices (N,) or, multi-label, 0/1 (N, K)."""
    probs = np.asarray(probs)
    if task == "multilabel":
        return (probs >= threshold).astype(np.int64)
    if task == "binary":
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else math.nan


def binary_counts_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and F1 from a 2x2 table (NaN where undefined)."""
    sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    return {
        "sensitivity": sens,
        "specificity": _ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support": int(tp + fn),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, task: str, class_names: list[str], threshold: float = 0.5
) -> dict:
    """Every headline metric of a classifier on one split.

    labels: (N,) int class indices, or (N, K) 0/1 for multi-label.
    probs: (N, K) class probabilities.
    Returns a JSON-ready dict: ``auc``, ``acc``, ``balanced_acc`` (single-label),
    ``per_class`` (one-vs-rest sensitivity, specificity, PPV, NPV, F1, support, AUC),
    ``confusion_matrix`` (single-label), ``n_images``, ``threshold``.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    pred = predict_labels(probs, task, threshold)
    if task == "multilabel":
        truth = labels.astype(np.int64)
    else:
        truth = np.eye(k, dtype=np.int64)[labels]
        pred_onehot = np.eye(k, dtype=np.int64)[pred]
    decided = pred if task == "multilabel" else pred_onehot
    per_class = {}
    for i, name in enumerate(class_names):
        t, p = truth[:, i].astype(bool), decided[:, i].astype(bool)
        row = binary_counts_metrics(int((t & p).sum()), int((~t & p).sum()), int((~t & ~p).sum()), int((t & ~p).sum()))
        row["auc"] = roc_auc(t, probs[:, i])
        per_class[name] = row

    if task == "binary":
        auc = roc_auc(labels == 1, probs[:, 1])
    else:
        auc = float(np.nanmean([per_class[c]["auc"] for c in class_names])) if k else math.nan
    out: dict = {"task": task, "n_images": int(len(labels)), "threshold": threshold, "auc": auc}
    if task == "multilabel":
        out["acc"] = float((pred == truth).mean(axis=0).mean())
    else:
        out["acc"] = float((pred == labels).mean())
        out["balanced_acc"] = float(np.nanmean([per_class[c]["sensitivity"] for c in class_names]))
        out["confusion_matrix"] = confusion_matrix(labels, pred, k).tolist()
    out["class_names"] = list(class_names)
    out["per_class"] = per_class
    return out


def json_safe(obj: object) -> object:
    """Replace NaN/inf floats by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
