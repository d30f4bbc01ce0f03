"""The shortcut guard: covariates that give the label away.

A covariate that alone predicts the diagnosis almost perfectly is more often a label proxy (how the
diagnosis was confirmed, the clinic that only sees one disease, an acquisition setting chosen because
of the finding) than a clinical predictor; a model that leans on it will fail where the proxy is
absent. Two checks per covariate, each fitted on the training split and judged on validation:

- **AUC**: the covariate alone (its class frequencies per value; numbers binned at the training
  deciles, missing as a value of its own) predicts the label with validation AUC >= 0.95 (binary: the
  positive class; otherwise the mean one-vs-rest AUC);
- **decides**: one value of a categorical covariate, held by at least 10% of the training images,
  means one class in at least 99% of them while that class is at most 90% of the other images
  (HAM10000's ``dx_type = follow_up`` is always a nevus).

A covariate's score takes a few values only (one per level or bin), so its AUC is counted from the
value-by-class table (ties scoring a half), in microseconds: a 1,000-column table is checked in seconds.
"""

from __future__ import annotations

import math

import numpy as np

from meddiag.data.covariates import CovariateSchema, CovariateTable
from meddiag.data.dataset import ImageData

AUC_LIMIT = 0.95
DECIDES_SHARE, DECIDES_PURITY, DECIDES_ELSEWHERE = 0.10, 0.99, 0.90


def _codes(train: CovariateTable, other: CovariateTable, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Integer codes of column ``name`` in both tables (0: missing), and the value each code stands for."""
    if name in train.numeric_names:
        j = train.numeric_names.index(name)
        a, b = train.numeric[:, j], other.numeric[:, j]
        edges = np.unique(np.nanquantile(a, np.linspace(0.1, 0.9, 9))) if np.isfinite(a).any() else np.array([])

        def code(v: np.ndarray) -> np.ndarray:
            return np.where(np.isnan(v), 0, np.searchsorted(edges, np.nan_to_num(v), side="right") + 1)

        return code(a), code(b), ["missing"] + [f"bin {i}" for i in range(len(edges) + 1)]
    j = train.categorical_names.index(name)
    levels = sorted({v for v in train.categorical[:, j] if v is not None})
    index = {v: k + 1 for k, v in enumerate(levels)}
    return (np.array([index.get(v, 0) if v is not None else 0 for v in train.categorical[:, j]]),
            np.array([index.get(v, 0) if v is not None else 0 for v in other.categorical[:, j]]), ["missing", *levels])


def _onehot(labels: np.ndarray, k: int) -> np.ndarray:
    if labels.ndim == 2:
        return labels
    return np.eye(k)[labels]


def _discrete_auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUC of a score with few distinct values for 0/1 labels ``y``: P(positive scores higher) + P(tie) / 2."""
    values, inverse = np.unique(score, return_inverse=True)
    pos = np.bincount(inverse, weights=y.astype(np.float64), minlength=len(values))
    neg = np.bincount(inverse, weights=1.0 - y, minlength=len(values))
    if pos.sum() == 0 or neg.sum() == 0:
        return math.nan
    below = np.cumsum(neg) - neg  # negatives scoring strictly lower
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def _auc(truth: np.ndarray, score: np.ndarray, task: str) -> float:
    """Binary: the positive class's AUC; else the mean over classes (labels) with both outcomes known."""
    columns = [1] if task == "binary" else range(truth.shape[1])
    aucs = []
    for c in columns:
        known = np.isfinite(truth[:, c])
        y = truth[known, c]
        if 0 < y.sum() < len(y):
            aucs.append(_discrete_auc(y, score[known, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


def covariate_shortcuts(data: ImageData, schema: CovariateSchema) -> list[dict]:
    """Findings of both checks as ``{"covariate", "check", "value", "message"}`` (empty: none)."""
    train, val = data.splits["train"], data.splits["val"]
    if train.covariates is None or val.covariates is None:
        return []
    k = data.num_classes
    y_train = _onehot(train.labels.numpy(), k).astype(np.float64)
    y_val = _onehot(val.labels.numpy(), k).astype(np.float64)
    findings = []
    for name in schema.names:
        a, b, values = _codes(train.covariates, val.covariates, name)
        counts = np.zeros((len(values), k))
        known = np.nan_to_num(y_train)
        np.add.at(counts, a, known)
        totals = np.bincount(a, minlength=len(values)).astype(np.float64)
        rates = (counts + 1.0) / (totals[:, None] + 2.0)  # Laplace-smoothed class frequency per value
        auc = _auc(y_val, rates[b], data.task)
        if auc >= AUC_LIMIT:
            findings.append({"covariate": name, "check": "auc", "value": round(auc, 4), "message": (
                f"shortcut? the covariate '{name}' alone predicts the label with validation AUC {auc:.3f} (>= {AUC_LIMIT}): "
                "it may be a label proxy (how the diagnosis was made, an acquisition setting); if so, leave it out")})
            continue
        if name not in train.covariates.categorical_names or data.task == "multilabel":
            continue
        n = len(a)
        for code in range(1, len(values)):
            held = a == code
            if held.sum() < DECIDES_SHARE * n:
                continue
            share = counts[code] / held.sum()
            top = int(share.argmax())
            elsewhere = known[~held, top].mean() if (~held).any() else 1.0
            if share[top] >= DECIDES_PURITY and elsewhere <= DECIDES_ELSEWHERE:
                cls = data.class_names[top]
                findings.append({"covariate": name, "check": "decides", "value": values[code], "message": (
                    f"shortcut? {name} = '{values[code]}' means class '{cls}' in {int(counts[code, top])} of its "
                    f"{int(held.sum())} training images ({held.mean():.0%} of them), against {elsewhere:.0%} elsewhere: "
                    f"'{name}' may be a label proxy (how the diagnosis was made); if so, leave it out")})
                break
    return findings
