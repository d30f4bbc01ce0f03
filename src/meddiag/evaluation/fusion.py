"""Did the patient data help? The report's fusion section, computed on one test split.

For a model that takes covariates, on the same test images:

- **fused**: the model with every covariate the data has;
- **image only**: the same model with every covariate withheld (what it answers for a patient whose
  data is unknown; covariate dropout trained it for this);
- **covariates only**: gradient-boosted trees (scikit-learn's ``HistGradientBoostingClassifier``, which
  takes missing values natively) fitted on the run's training split's covariates, with no image;
- the paired bootstrap (patients resampled where known) 95% CI of the fused model's AUC and balanced
  accuracy minus each comparator's;
- **robustness**: the fused model's AUC with 0%, 25%, 50% and 100% of the test covariates withheld
  (each case's each block independently, seeded);
- **importance**: for each covariate block, the fused model's test AUC lost when that block alone is
  withheld from every case.

A separately trained image-only run can be compared too (``compare``: its test probabilities).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from meddiag.data.covariates import CovariateTable
from meddiag.data.dataset import Split
from meddiag.evaluation import stats
from meddiag.evaluation.metrics import balanced_accuracy, macro_auc
from meddiag.models.checkpoint import ModelCard
from meddiag.models.fusion import withhold

FRACTIONS = (0.0, 0.25, 0.5, 1.0)


def tree_features(table: CovariateTable, levels: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, P+Q) float: numbers as they are (NaN missing), categories as codes of the training ``levels``
    (NaN missing or unseen); and the categorical-column mask."""
    cats = np.full((len(table), len(table.categorical_names)), np.nan)
    for j, name in enumerate(table.categorical_names):
        index = {v: k for k, v in enumerate(levels[name])}
        cats[:, j] = [index.get(v, np.nan) if v is not None else np.nan for v in table.categorical[:, j]]
    x = np.concatenate([table.numeric, cats], axis=1)
    mask = np.array([False] * len(table.numeric_names) + [True] * len(table.categorical_names))
    return x, mask


def boosted_trees_probabilities(train: Split, test: Split, num_classes: int, seed: int = 0) -> np.ndarray:
    """(N_test, K) probabilities of gradient-boosted trees fitted on ``train``'s covariates alone."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    assert train.covariates is not None and test.covariates is not None
    levels = {n: sorted({v for v in train.covariates.categorical[:, j] if v is not None})
              for j, n in enumerate(train.covariates.categorical_names)}
    x_train, mask = tree_features(train.covariates, levels)
    x_test, _ = tree_features(test.covariates, levels)
    y = train.labels.numpy()
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True, validation_fraction=0.15,
                                           n_iter_no_change=20, categorical_features=mask if mask.any() else None,
                                           random_state=seed)
    model.fit(x_train, y)
    probs = np.zeros((len(x_test), num_classes))
    probs[:, model.classes_.astype(int)] = model.predict_proba(x_test)
    return probs


def paired_difference(labels: np.ndarray, a: np.ndarray, b: np.ndarray, task: str, threshold: float,
                      groups: list[str] | None, n_resamples: int, seed: int) -> dict:
    """AUC and balanced accuracy of probabilities ``a`` minus those of ``b`` on the same cases, with
    paired bootstrap 95% CIs (the same resamples for both)."""
    def diff(idx: np.ndarray) -> dict[str, float]:
        y = labels[idx]
        return {"auc": macro_auc(y, a[idx], task) - macro_auc(y, b[idx], task),
                "balanced_acc": balanced_accuracy(y, a[idx], task, threshold) - balanced_accuracy(y, b[idx], task, threshold)}

    point = diff(np.arange(len(labels)))
    ci = stats.bootstrap_ci(diff, len(labels), groups, n_resamples, seed)
    return {key: {"difference": point[key], "ci": ci[key],
                  "excludes_zero": bool(ci[key][0] > 0 or ci[key][1] < 0) if all(map(math.isfinite, ci[key])) else False}
            for key in point}


def fusion_analysis(probabilities, card: ModelCard, test: Split, train: Split | None, *,  # noqa: ANN001 - a callable
                    n_resamples: int = 1000, seed: int = 0, compare: dict[str, np.ndarray] | None = None) -> dict:
    """The fusion section. ``probabilities(covariates (N, F) tensor or None) -> (N, K)`` runs the model
    on ``test``'s images; ``train`` (the run's training split) fits the covariates-only trees (None:
    not computed). ``compare``: more comparators' test probabilities by name (e.g. an image-only run)."""
    schema = card.covariates
    assert schema is not None and test.covariates is not None
    labels = test.labels.numpy()
    encoded = torch.from_numpy(schema.encode(test.covariates))
    missing_row = torch.from_numpy(schema.missing_row())
    blocks = schema.block_features()
    block_index = [torch.tensor(ix) for ix in blocks.values()]
    fused = probabilities(encoded)
    comparators: dict[str, np.ndarray] = {"image only (covariates withheld)": probabilities(None)}
    if train is not None and train.covariates is not None and card.task != "multilabel":
        comparators["covariates only (boosted trees)"] = boosted_trees_probabilities(train, test, card.num_classes, seed)
    comparators.update(compare or {})

    def summary(probs: np.ndarray) -> dict:
        return {"auc": macro_auc(labels, probs, card.task), "balanced_acc": balanced_accuracy(labels, probs, card.task, card.threshold)}

    models = {"fused": summary(fused), **{name: summary(p) for name, p in comparators.items()}}
    differences = {name: paired_difference(labels, fused, p, card.task, card.threshold, test.groups, n_resamples, seed)
                   for name, p in comparators.items()}
    rng = np.random.default_rng(seed)
    robustness = []
    for fraction in FRACTIONS:
        if fraction in (0.0, 1.0):
            probs = fused if fraction == 0.0 else comparators["image only (covariates withheld)"]
        else:
            drop = torch.from_numpy(rng.random((len(labels), len(blocks))) < fraction)
            probs = probabilities(withhold(encoded, missing_row, block_index, drop))
        robustness.append({"withheld": fraction, "auc": macro_auc(labels, probs, card.task)})
    importance = []
    for b, name in enumerate(blocks):
        drop = torch.zeros((len(labels), len(blocks)), dtype=torch.bool)
        drop[:, b] = True
        probs = probabilities(withhold(encoded, missing_row, block_index, drop))
        importance.append({"covariate": name, "auc_lost": models["fused"]["auc"] - macro_auc(labels, probs, card.task)})
    importance.sort(key=lambda r: -r["auc_lost"])
    missing = {name: float(mask.mean()) for name, mask in test.covariates.missing_mask().items()}
    return {"covariates": schema.names, "fusion": card.fusion, "n": len(labels), "models": models,
            "differences": differences, "robustness": robustness, "importance": importance,
            "test_missing_rate": missing if len(missing) <= 50 else {"mean over columns": float(np.mean(list(missing.values())))},
            "n_resamples": n_resamples, "resampled": "patients" if test.groups is not None else "images"}

