"""The statistics of a diagnostic accuracy study: confidence intervals, operating points,
calibration and clinical utility.

Everything here works on plain arrays (labels, scores) so it can be checked against an
independent implementation; :mod:`meddiag.evaluation.report` assembles it into a report.

- Proportions (sensitivity, specificity, PPV, NPV) get Wilson score intervals.
- AUCs and F1 get percentile bootstrap intervals: seeded, >= 1000 resamples, resampling
  patients (with all their images) instead of images when patient ids are known.
- Operating points are thresholds chosen on one split (validation) and reported on another
  (test): choosing and reporting on the same images would flatter the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from meddiag.evaluation.metrics import binary_counts_metrics, roc_auc

Z95 = 1.959963984540054  # two-sided 95% normal quantile
OPERATING_POINTS = {
    "youden": "maximum Youden's J (sensitivity + specificity - 1)",
    "sens90": "sensitivity >= 0.90 (highest threshold reaching it)",
    "sens95": "sensitivity >= 0.95 (highest threshold reaching it)",
    "spec90": "specificity >= 0.90 (lowest threshold reaching it)",
}


# ---------------------------------------------------------------- intervals

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (nan, nan) when ``n`` is 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_indices(n: int, groups: Sequence[str] | None, n_resamples: int, seed: int) -> list[np.ndarray]:
    """Index arrays of ``n_resamples`` bootstrap samples of ``n`` items. With ``groups``, whole
    groups (patients) are drawn with replacement and contribute all their items."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n, n) for _ in range(n_resamples)]
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    samples = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(members), len(members))
        samples.append(np.concatenate([members[g] for g in drawn]))
    return samples


def bootstrap_ci(statistic: Callable[[np.ndarray], dict[str, float]], n: int, groups: Sequence[str] | None = None,
                 n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every value ``statistic(index)`` returns.

    ``statistic`` takes the indices of one resample and returns named values; resamples where a
    value is undefined (NaN, e.g. an AUC with one class drawn) are left out of that value's interval.
    """
    draws: dict[str, list[float]] = {}
    for idx in bootstrap_indices(n, groups, n_resamples, seed):
        for key, value in statistic(idx).items():
            draws.setdefault(key, []).append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[np.isfinite(arr)]
        out[key] = (float(np.percentile(arr, tail)), float(np.percentile(arr, 100 - tail))) if arr.size else (math.nan, math.nan)
    return out


# ---------------------------------------------------------------- curves and areas

def micro_auc(truth: np.ndarray, probs: np.ndarray) -> float:
    """Micro-averaged AUC: every (image, class) pair pooled into one binary problem."""
    return roc_auc(np.asarray(truth).ravel(), np.asarray(probs).ravel())


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): deciding positive when score >= threshold, one point per distinct
    score from the highest down, starting at (0, 0) with threshold +inf."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps, fps = np.cumsum(y_sorted)[last], np.cumsum(~y_sorted)[last]
    pos, neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos], np.r_[np.inf, s_sorted[last]]


def precision_recall_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every distinct score threshold, from the highest score down."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    y_sorted = y[order]
    last = np.r_[np.flatnonzero(np.diff(s[order])), s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    predicted = last + 1
    return tps / max(1, int(y.sum())), tps / predicted


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum over recall increments
    (sum of (R_n - R_{n-1}) P_n, no interpolation); NaN without positives."""
    if not np.asarray(y_true).astype(bool).any():
        return math.nan
    recall, precision = precision_recall_curve(y_true, score)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---------------------------------------------------------------- operating points

def choose_threshold(y_true: np.ndarray, score: np.ndarray, rule: str) -> float:
    """The threshold (positive when score >= threshold) that ``rule`` picks on these data.

    ``youden``: maximum sensitivity + specificity - 1 (the highest such threshold on ties);
    ``sensXX``: the highest threshold whose sensitivity is >= XX%; ``specXX``: the lowest
    threshold whose specificity is >= XX%.
    """
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        raise ValueError("choosing a threshold needs both positive and negative cases")
    fpr, tpr, thresholds = roc_curve(y, score)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf point: nobody positive
    if rule == "youden":
        j = tpr - fpr
        return float(thresholds[int(np.flatnonzero(j == j.max())[0])])
    kind, target = rule[:4], rule[4:]
    if kind not in ("sens", "spec") or not target.isdigit():
        raise ValueError(f"unknown operating point '{rule}': use youden, sensNN or specNN (e.g. sens90, spec95)")
    level = int(target) / 100
    if kind == "sens":
        ok = np.flatnonzero(tpr >= level - 1e-12)
        return float(thresholds[ok[0]])  # thresholds fall as we go: the first is the highest
    ok = np.flatnonzero(1 - fpr >= level - 1e-12)
    if not ok.size:  # even the highest score's threshold misses the specificity (few negatives, a tie at the top):
        return float(np.nextafter(np.max(score), np.inf))  # only calling no case positive reaches it
    return float(thresholds[ok[-1]])


def binary_table(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """The 2x2 table at ``threshold`` with sensitivity, specificity, PPV, NPV (Wilson 95% CIs) and F1."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(score) >= threshold
    tp, fp, tn, fn = int((y & p).sum()), int((~y & p).sum()), int((~y & ~p).sum()), int((y & ~p).sum())
    out = binary_counts_metrics(tp, fp, tn, fn)
    for name, (k, n) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                         "ppv": (tp, tp + fp), "npv": (tn, tn + fn)}.items():
        out[f"{name}_ci"] = wilson_interval(k, n)
    out["threshold"] = float(threshold)
    return out


def f1_bootstrap_ci(y_true: np.ndarray, score: np.ndarray, threshold: float, groups: Sequence[str] | None,
                    n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of F1 at a fixed threshold (F1 is not a proportion)."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(score) >= threshold

    def f1(idx: np.ndarray) -> dict[str, float]:
        yy, pp = y[idx], p[idx]
        tp = (yy & pp).sum()
        den = 2 * tp + (~yy & pp).sum() + (yy & ~pp).sum()
        return {"f1": 2 * tp / den if den else math.nan}

    return bootstrap_ci(f1, len(y), groups, n_resamples, seed)["f1"]


# ---------------------------------------------------------------- calibration

def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with ``bins`` equal-mass bins: sum over bins of (bin share) x |mean confidence - accuracy|."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    order = np.argsort(conf, kind="mergesort")
    total = 0.0
    for part in np.array_split(order, min(bins, conf.size)):
        if part.size:
            total += part.size / conf.size * abs(conf[part].mean() - hit[part].mean())
    return float(total)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Equal-mass bins: mean confidence, observed frequency and count of each."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    order = np.argsort(conf, kind="mergesort")
    return [{"confidence": float(conf[p].mean()), "observed": float(hit[p].mean()), "n": int(p.size)}
            for p in np.array_split(order, min(bins, conf.size)) if p.size]


def brier_score(truth_onehot: np.ndarray, probs: np.ndarray) -> float:
    """Mean over images of the squared distance between the probability vector and the truth
    (binary: computed on the positive class alone, the usual definition)."""
    t, p = np.asarray(truth_onehot, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if t.ndim == 1:
        return float(np.mean((p - t) ** 2))
    return float(np.mean(np.sum((p - t) ** 2, axis=1)))


def logit(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _logistic_fit(x: np.ndarray | None, y: np.ndarray, offset: np.ndarray, iterations: int = 100) -> np.ndarray:
    """Maximum-likelihood logistic regression y ~ a + b x + offset by Newton-Raphson.
    Returns [a] without ``x``, else [a, b]."""
    design = np.ones((y.size, 1)) if x is None else np.column_stack([np.ones(y.size), x])
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        mu = _sigmoid(design @ beta + offset)
        gradient = design.T @ (y - mu)
        hessian = design.T @ (design * (mu * (1 - mu))[:, None]) + 1e-10 * np.eye(design.shape[1])
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def calibration_slope_intercept(y_true: np.ndarray, prob: np.ndarray) -> tuple[float, float]:
    """Calibration slope (b in logit P(y) = a + b logit(p)) and calibration intercept
    (calibration-in-the-large: a in logit P(y) = a + logit(p), the slope fixed at 1).
    A perfectly calibrated model has slope 1 and intercept 0; slope < 1 means overconfident.
    Probabilities are clipped to [1e-6, 1 - 1e-6], the precision of float32 outputs and of the
    prediction files, so that a saturated 1.0 is a large logit, not an infinite one."""
    y = np.asarray(y_true, dtype=np.float64)
    if y.min() == y.max():
        return math.nan, math.nan
    lp = logit(prob, 1e-6)
    slope = float(_logistic_fit(lp, y, np.zeros_like(lp))[1])
    intercept = float(_logistic_fit(None, y, lp)[0])
    return slope, intercept


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray, multilabel: bool = False) -> float:
    """Temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) (sigmoid for
    multi-label) on these data. ``log_probs`` are log-probabilities (single-label, any constant per
    row is irrelevant to softmax) or logits (multi-label)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = z / math.exp(log_t)
        if multilabel:
            mask = np.isfinite(y.astype(np.float64))
            p = np.clip(_sigmoid(scaled), 1e-12, 1 - 1e-12)
            yy = np.nan_to_num(y.astype(np.float64))
            return float(-np.sum(mask * (yy * np.log(p) + (1 - yy) * np.log(1 - p))) / max(1, mask.sum()))
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        log_softmax = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(len(y)), y.astype(int)].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def apply_temperature(probs: np.ndarray, temperature: float, multilabel: bool = False) -> np.ndarray:
    """Probabilities after temperature scaling (probabilities in, probabilities out)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    if multilabel:
        return _sigmoid(logit(p) / temperature)
    z = np.log(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------- clinical utility

def net_benefit(y_true: np.ndarray, score: np.ndarray, thresholds: np.ndarray) -> dict[str, list[float]]:
    """Decision curve (Vickers & Elkin 2006): net benefit of treating when score >= pt, for each
    threshold probability pt, beside treating everyone and no one (always 0).
    NB = TP/N - FP/N x pt / (1 - pt)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n = y.size
    prevalence = y.mean()
    model, treat_all = [], []
    for pt in thresholds:
        odds = pt / (1 - pt)
        p = s >= pt
        model.append(float((y & p).sum() / n - (~y & p).sum() / n * odds))
        treat_all.append(float(prevalence - (1 - prevalence) * odds))
    return {"threshold": [float(t) for t in thresholds], "model": model, "treat_all": treat_all,
            "treat_none": [0.0] * len(thresholds)}


# ---------------------------------------------------------------- selective prediction

def abstention_threshold(uncertainty: np.ndarray, coverage: float) -> float:
    """The uncertainty above which to abstain so that a fraction ``coverage`` of these cases is kept
    (chosen on validation, applied to new images)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    u = np.sort(np.asarray(uncertainty, dtype=np.float64))
    keep = max(1, math.floor(coverage * len(u) + 1e-9))
    return float(u[keep - 1]) if keep < len(u) else float(u[-1])


def risk_coverage(errors: np.ndarray, uncertainty: np.ndarray) -> dict:
    """Selective prediction on labelled cases: the error among the cases kept, keeping the most
    certain first, at every coverage; and at 100%, 90% and 80%."""
    order = np.argsort(uncertainty, kind="mergesort")
    wrong = np.asarray(errors, dtype=np.float64)[order]
    n = len(wrong)
    kept = np.arange(1, n + 1)
    risk = np.cumsum(wrong) / kept
    at = {}
    for c in (1.0, 0.9, 0.8):
        k = max(1, math.floor(c * n + 1e-9))
        at[f"{int(c * 100)}"] = float(risk[k - 1])
    return {"coverage": (kept / n).tolist(), "risk": risk.tolist(), "error_at": at}
