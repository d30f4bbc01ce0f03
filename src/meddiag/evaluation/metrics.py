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


def macro_auc(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """The headline AUC (``classification_metrics``' ``auc``) alone, cheap enough for a bootstrap loop: the
    positive class's (binary), else the mean one-vs-rest AUC over classes (labels, unrecorded ones left out)."""
    truth = labels if labels.ndim == 2 else np.eye(probs.shape[1])[labels]
    columns = [1] if task == "binary" else range(probs.shape[1])
    aucs = []
    for c in columns:
        known = np.isfinite(truth[:, c])
        aucs.append(roc_auc(truth[known, c], probs[known, c]))
    return float(np.nanmean(aucs)) if any(math.isfinite(a) for a in aucs) else math.nan


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray, task: str, threshold: float) -> float:
    """Mean per-class sensitivity of the decisions (argmax; binary: at ``threshold``); NaN for multi-label."""
    if task == "multilabel":
        return math.nan
    decided = predict_labels(probs, task, threshold)
    return float(np.nanmean([(decided[labels == c] == c).mean() if (labels == c).any() else np.nan
                             for c in range(probs.shape[1])]))


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


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 / (K - 1)^2: agreement on ordinal grades,
    penalising a miss by two grades four times a miss by one."""
    observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    n = observed.sum()
    if n == 0:
        return math.nan
    expected = np.outer(observed.sum(1), observed.sum(0)) / n
    i, j = np.indices((num_classes, num_classes))
    weights = (i - j) ** 2 / max(1, (num_classes - 1) ** 2)
    denom = (weights * expected).sum()
    return float(1 - (weights * observed).sum() / denom) if denom else math.nan


def is_ordinal(class_names: list[str]) -> bool:
    """Grades: three or more classes named by consecutive integers (``0``..``4``, as RetinaMNIST and
    graded folders are). Their metrics add quadratic-weighted kappa and mean absolute error."""
    try:
        values = [int(c) for c in class_names]
    except ValueError:
        return False
    return len(values) >= 3 and values == list(range(values[0], values[0] + len(values)))


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, task: str, class_names: list[str], threshold: float = 0.5,
    ordinal: bool | None = None,
) -> dict:
    """Every headline metric of a classifier on one split.

    labels: (N,) int class indices, or (N, K) 0/1 for multi-label.
    probs: (N, K) class probabilities.
    ``ordinal`` (None: :func:`is_ordinal` of the class names) adds ``quadratic_weighted_kappa``
    and ``mae`` for graded classes.
    Returns a JSON-ready dict: ``auc``, ``acc``, ``balanced_acc`` (single-label),
    ``per_class`` (one-vs-rest sensitivity, specificity, PPV, NPV, F1, support, AUC),
    ``confusion_matrix`` (single-label), ``n_images``, ``threshold``.
    """
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    ordinal = is_ordinal(class_names) if ordinal is None else ordinal
    pred = predict_labels(probs, task, threshold)
    if task == "multilabel":
        known = np.isfinite(labels.astype(np.float64))  # an unrecorded finding is NaN: left out, never negative
        truth = np.nan_to_num(labels.astype(np.float64)).astype(np.int64)
    else:
        truth = np.eye(k, dtype=np.int64)[labels]
        known = np.ones_like(truth, dtype=bool)
        pred_onehot = np.eye(k, dtype=np.int64)[pred]
    decided = pred if task == "multilabel" else pred_onehot
    per_class = {}
    for i, name in enumerate(class_names):
        m = known[:, i]
        t, p = truth[m, i].astype(bool), decided[m, i].astype(bool)
        row = binary_counts_metrics(int((t & p).sum()), int((~t & p).sum()), int((~t & ~p).sum()), int((t & ~p).sum()))
        row["auc"] = roc_auc(t, probs[m, i])
        if task == "multilabel":
            row["unknown"] = int((~m).sum())
        per_class[name] = row

    if task == "binary":
        auc = roc_auc(labels == 1, probs[:, 1])
    else:
        auc = float(np.nanmean([per_class[c]["auc"] for c in class_names])) if k else math.nan
    out: dict = {"task": task, "n_images": int(len(labels)), "threshold": threshold, "auc": auc}
    if task == "multilabel":
        out["acc"] = float(np.nanmean([(pred[known[:, i], i] == truth[known[:, i], i]).mean() if known[:, i].any() else np.nan
                                       for i in range(k)]))
    else:
        out["acc"] = float((pred == labels).mean())
        out["balanced_acc"] = float(np.nanmean([per_class[c]["sensitivity"] for c in class_names]))
        out["confusion_matrix"] = confusion_matrix(labels, pred, k).tolist()
        if ordinal:
            out["quadratic_weighted_kappa"] = quadratic_weighted_kappa(labels, pred, k)
            out["mae"] = float(np.abs(labels - pred).mean())  # in grades, of the most probable grade
            out["mae_expected_grade"] = float(np.abs(labels - probs @ np.arange(k)).mean())
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
