"""Metrics checked against scikit-learn, computed independently."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from meddiag.evaluation.metrics import classification_metrics, roc_auc


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_auc_matches_sklearn_with_ties(rng):
    y = rng.integers(0, 2, 500)
    score = np.round(rng.random(500) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert math.isnan(roc_auc(np.ones(5), rng.random(5)))


def test_binary_metrics_match_sklearn(rng):
    y = rng.integers(0, 2, 400)
    p1 = np.clip(0.35 * y + rng.random(400) * 0.65, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, "binary", ["neg", "pos"], threshold=0.4)
    pred = (p1 >= 0.4).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    pos = m["per_class"]["pos"]
    assert pos["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert pos["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert pos["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert pos["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert pos["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert pos["support"] == int(y.sum()) and m["n_images"] == 400


def test_multiclass_metrics_match_sklearn(rng):
    y = rng.integers(0, 4, 600)
    logits = rng.normal(size=(600, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, probs, "multiclass", names)
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(skm.accuracy_score(y, pred))
    f1 = skm.f1_score(y, pred, average=None)
    recall = skm.recall_score(y, pred, average=None)
    for i, name in enumerate(names):
        assert m["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert m["per_class"][name]["sensitivity"] == pytest.approx(recall[i])


def test_multilabel_auc_and_acc_follow_medmnist(rng):
    y = rng.integers(0, 2, (300, 3))
    probs = np.clip(0.4 * y + 0.6 * rng.random((300, 3)), 0, 1)
    m = classification_metrics(y, probs, "multilabel", ["x", "y", "z"])
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"))
    assert m["acc"] == pytest.approx(np.mean([skm.accuracy_score(y[:, i], probs[:, i] >= 0.5) for i in range(3)]))


def test_undefined_values_are_nan_not_errors():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]), "binary", ["n", "p"])
    assert math.isnan(m["auc"]) and math.isnan(m["per_class"]["p"]["specificity"])
