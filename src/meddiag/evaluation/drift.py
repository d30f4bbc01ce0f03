"""Dataset shift: is a batch of new inputs drawn from the distribution the model was validated on?

Label-free two-sample tests of the batch against the checkpoint's
:class:`~meddiag.models.ood.ShiftReference` (a sample of the validation split, as the network sees it):

- ``features``: the maximum mean discrepancy (MMD², Gretton et al. 2012; unbiased, Gaussian kernel with the
  median-distance bandwidth) between the penultimate features, each standardised by the reference; for a
  network without them (an ensemble), between the predicted probabilities (black-box shift detection's
  soft form, Rabanser et al. 2019). Permutation p-value.
- ``predicted_classes``: the shift of predicted-class frequencies (black-box shift detection, Lipton et al.
  2018): a chi-square-type statistic over the classes (multi-label: the findings' positive rates) with a
  permutation p-value, valid for the small counts of small batches.
- ``flagged``: whether the OOD rule flags more of the batch than of the reference (Fisher's exact test,
  one-sided).

The batch's p-value is the smallest of them, Bonferroni-corrected for their number; a shift is reported when
it is below ``alpha``. Permutation p-values are (1 + #{permuted >= observed}) / (1 + permutations).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from meddiag.evaluation.metrics import predict_labels
from meddiag.models.checkpoint import ModelCard
from meddiag.models.inference import logits_to_probs
from meddiag.models.ood import ShiftReference

PERMUTATIONS = 1000
ALPHA = 0.05
MIN_BATCH = 10  # fewer inputs than this: no test (a p-value of a handful of cases says nothing)
MAX_BATCH = 2000  # larger batches are tested on a random sample of this many (every input is still scored)


def mmd_test(reference: np.ndarray, batch: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, float]:
    """Unbiased MMD² between (n, D) ``reference`` and (m, D) ``batch`` (standardised by the reference's
    per-dimension mean and spread), Gaussian kernel with the median pairwise squared distance as its
    bandwidth; p-value from ``permutations`` random relabellings of the pooled sample."""
    x, y = np.asarray(reference, np.float64), np.asarray(batch, np.float64)
    centre, spread = x.mean(0), x.std(0)
    spread = np.maximum(spread, 1e-3 * max(float(spread.mean()), 1e-12))  # a dimension constant in the reference still counts
    z = (np.concatenate([x, y]) - centre) / spread
    squares = (z * z).sum(1)
    d2 = np.maximum(squares[:, None] + squares[None, :] - 2 * z @ z.T, 0)
    off_diagonal = d2[np.triu_indices(len(z), 1)]
    bandwidth = float(np.median(off_diagonal)) or float(off_diagonal.mean()) or 1.0
    kernel = np.exp(-d2 / bandwidth)
    np.fill_diagonal(kernel, 0.0)
    n, m = len(x), len(y)
    observed = _mmd2(kernel, np.r_[np.ones(n), np.zeros(m)][None], n, m)[0]
    permuted = _permuted(lambda masks: _mmd2(kernel, masks, n, m), n, m, permutations, seed)
    return {"statistic": float(observed), "p_value": _p_value(observed, permuted), "bandwidth": bandwidth}


def _mmd2(kernel: np.ndarray, masks: np.ndarray, n: int, m: int) -> np.ndarray:
    """The unbiased MMD² for each (N,) 0/1 row of ``masks`` (1: reference), kernel diagonal zeroed."""
    a = masks.T  # (N, P)
    b = 1.0 - a
    ka, kb = kernel @ a, kernel @ b
    xx, yy, xy = (a * ka).sum(0), (b * kb).sum(0), (a * kb).sum(0)
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)


def class_shift_test(reference: np.ndarray, batch: np.ndarray, permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, Any]:
    """Whether (n, K) and (m, K) 0/1 indicators of the predicted classes (one-hot; multi-label: the findings
    called positive) differ in frequency: sum over classes of (batch share - reference share)² over the pooled
    share's variance, p-value by permutation."""
    x, y = np.asarray(reference, np.float64), np.asarray(batch, np.float64)
    pooled = np.concatenate([x, y])
    n, m = len(x), len(y)
    p = pooled.mean(0)
    variance = p * (1 - p) * (1 / n + 1 / m)
    usable = variance > 0  # a class never (or always) predicted in either sample carries no evidence

    def statistic(masks: np.ndarray) -> np.ndarray:
        ref_share = masks @ pooled / n
        batch_share = (1 - masks) @ pooled / m
        return (((batch_share - ref_share)[:, usable]) ** 2 / variance[usable]).sum(1)

    observed = statistic(np.r_[np.ones(n), np.zeros(m)][None])[0]
    permuted = _permuted(statistic, n, m, permutations, seed)
    return {"statistic": float(observed), "p_value": _p_value(observed, permuted) if usable.any() else 1.0,
            "reference_share": x.mean(0).tolist(), "batch_share": y.mean(0).tolist()}


def flagged_test(reference_flagged: np.ndarray, batch_flagged: np.ndarray) -> dict[str, float]:
    """Whether the OOD rule flags a larger share of the batch than of the reference (Fisher's exact test)."""
    from scipy.stats import fisher_exact

    a, n = int(np.sum(batch_flagged)), len(batch_flagged)
    b, r = int(np.sum(reference_flagged)), len(reference_flagged)
    p = float(fisher_exact([[a, n - a], [b, r - b]], alternative="greater")[1])
    return {"batch_share": a / n if n else 0.0, "reference_share": b / r if r else 0.0, "p_value": p}


def _permuted(statistic: Any, n: int, m: int, permutations: int, seed: int, chunk: int = 250) -> np.ndarray:
    """``statistic`` of ``permutations`` random splits of the pooled n + m inputs into n and m."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, permutations, chunk):
        size = min(chunk, permutations - start)
        order = rng.permuted(np.tile(np.arange(n + m), (size, 1)), axis=1)
        masks = (order < n).astype(np.float64)
        out.append(statistic(masks))
    return np.concatenate(out) if out else np.empty(0)


def _p_value(observed: float, permuted: np.ndarray) -> float:
    return float((1 + np.sum(permuted >= observed - 1e-12 * abs(observed))) / (1 + len(permuted)))


def decisions(logits: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N, K) 0/1 indicators of the classes ``card``'s rule predicts from (N, K) plain-pass logits."""
    import torch

    probs = logits_to_probs(torch.as_tensor(logits).float(), card.task, card.temperature).numpy()
    decided = predict_labels(probs, card.task, card.threshold)
    return decided.astype(np.float64) if card.task == "multilabel" else np.eye(card.num_classes)[decided]


def batch_shift(reference: ShiftReference, card: ModelCard, logits: np.ndarray, features: np.ndarray | None,
                scores: np.ndarray | None, permutations: int = PERMUTATIONS, alpha: float = ALPHA, seed: int = 0) -> dict[str, Any]:
    """The shift tests of a batch (its plain-pass ``logits``, ``features`` and OOD ``scores``, N rows each)
    against ``reference``: ``tests`` (each with its ``p_value``), the Bonferroni-corrected ``p_value``
    and ``shift`` (it is below ``alpha``). Raises ValueError for a batch under :data:`MIN_BATCH` inputs."""
    import torch

    n = len(logits)
    if n < MIN_BATCH:
        raise ValueError(f"{n} input(s): a shift test needs at least {MIN_BATCH}")
    rng = np.random.default_rng(seed)
    tested = np.sort(rng.choice(n, MAX_BATCH, replace=False)) if n > MAX_BATCH else np.arange(n)
    ref_logits = reference.logits.numpy()
    tests: dict[str, dict[str, Any]] = {}
    if reference.features is not None and features is not None:
        space, ref_space, new_space = "penultimate features", reference.features.float().numpy(), np.asarray(features)[tested]
    else:
        space = "predicted probabilities"
        ref_space = logits_to_probs(torch.from_numpy(ref_logits), card.task, card.temperature).numpy()
        new_space = logits_to_probs(torch.as_tensor(np.asarray(logits)[tested]).float(), card.task, card.temperature).numpy()
    tests["features"] = {"space": space, **mmd_test(ref_space, new_space, permutations, seed)}
    shift = class_shift_test(decisions(ref_logits, card), decisions(np.asarray(logits)[tested], card), permutations, seed + 1)
    names = card.class_names
    tests["predicted_classes"] = {"statistic": shift["statistic"], "p_value": shift["p_value"],
                                  "reference_share": dict(zip(names, shift["reference_share"])),
                                  "batch_share": dict(zip(names, shift["batch_share"]))}
    rule = card.ood
    if rule is not None and scores is not None and reference.scores is not None:
        tests["flagged"] = {"method": rule.method, "threshold": rule.threshold,
                            **flagged_test(~(reference.scores.numpy() <= rule.threshold), ~(np.asarray(scores) <= rule.threshold))}
    smallest = min(t["p_value"] for t in tests.values())
    p_value = min(1.0, smallest * len(tests))
    return {"n": n, "tested": len(tested), "reference_n": len(reference), "permutations": permutations, "alpha": alpha,
            "tests": tests, "p_value": p_value, "shift": bool(p_value < alpha), "correction": "bonferroni"}


def shift_sentence(result: dict[str, Any]) -> str:
    """One line a person reads: shift or not, the p-value and which test says so."""
    tests = result["tests"]
    strongest = min(tests, key=lambda k: tests[k]["p_value"])
    label = {"features": "feature distribution", "predicted_classes": "predicted-class frequencies", "flagged": "share flagged as unfamiliar"}
    if result["shift"]:
        return (f"shift detected: p = {_fmt(result['p_value'])} (Bonferroni over {len(tests)} tests; strongest: "
                f"{label[strongest]}, p = {_fmt(tests[strongest]['p_value'])}) in {result['n']} input(s)")
    return f"no shift detected: p = {_fmt(result['p_value'])} (>= {result['alpha']:g}) in {result['n']} input(s)"


def _fmt(p: float) -> str:
    return f"{p:.3g}" if p >= 0.001 or p == 0 or not math.isfinite(p) else f"{p:.1e}"
