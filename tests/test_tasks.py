"""Task types beyond single-label: multi-label findings with unrecorded labels, ordinal grades."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from meddiag.evaluation.metrics import classification_metrics, is_ordinal, quadratic_weighted_kappa


def test_quadratic_weighted_kappa_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.clip(y + rng.integers(-2, 3, 300), 0, 4)
    assert quadratic_weighted_kappa(y, pred, 5) == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12)
    assert quadratic_weighted_kappa(y, y, 5) == pytest.approx(1.0)


def test_ordinal_classes_get_kappa_and_mae():
    assert is_ordinal(["0", "1", "2", "3", "4"]) and not is_ordinal(["0", "1"]) and not is_ordinal(["a", "b", "c"])
    assert not is_ordinal(["1", "3", "4"])
    labels = np.array([0, 1, 2, 3, 4, 4])
    probs = np.eye(5)[[0, 2, 2, 3, 1, 4]] * 0.9 + 0.02
    m = classification_metrics(labels, probs, "multiclass", ["0", "1", "2", "3", "4"])
    assert m["mae"] == pytest.approx((0 + 1 + 0 + 0 + 3 + 0) / 6)
    assert m["quadratic_weighted_kappa"] == pytest.approx(cohen_kappa_score(labels, probs.argmax(1), weights="quadratic"))
    assert "mae" not in classification_metrics(labels % 2, probs[:, :2], "binary", ["no", "yes"])


def test_multilabel_metrics_leave_unrecorded_findings_out():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    probs = np.clip(y * 0.6 + rng.random((200, 3)) * 0.4, 0, 1)
    y_missing = y.copy()
    y_missing[:50, 1] = np.nan
    m = classification_metrics(y_missing, probs, "multilabel", ["a", "b", "c"])
    assert m["per_class"]["b"]["auc"] == pytest.approx(roc_auc_score(y[50:, 1], probs[50:, 1]))
    assert m["per_class"]["b"]["unknown"] == 50 and m["per_class"]["a"]["unknown"] == 0
    assert m["per_class"]["b"]["support"] == int(y[50:, 1].sum())


def _multilabel_manifest(root, n=80, seed=0):
    """Two findings: a bright blob left ('nodule') and/or right ('effusion'); some not recorded."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        left, right = int(rng.random() < 0.5), int(rng.random() < 0.4)
        img = rng.normal(60, 10, (32, 32))
        yy, xx = np.mgrid[:32, :32]
        for on, cx in ((left, 9), (right, 23)):
            if on:
                img += 150 * np.exp(-((xx - cx) ** 2 + (yy - 16) ** 2) / 18)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "nodule": left, "effusion": "" if i % 7 == 0 else right, "site": "AB"[i % 2]})
    from conftest import write_csv

    return write_csv(root / "findings.csv", rows)


def test_multilabel_manifest_trains_evaluates_and_reports(tmp_path):
    from meddiag.data import load_data
    from test_end_to_end import meddiag

    manifest = _multilabel_manifest(tmp_path / "data")
    data = load_data(str(manifest), image_size=32, progress=False)
    assert data.task == "multilabel" and data.class_names == ["nodule", "effusion"]
    train = data.splits["train"].labels
    assert train.shape[1] == 2 and train[:, 1].isnan().any() and not train[:, 0].isnan().any()
    run = tmp_path / "run"
    proc = meddiag("train", str(manifest), "--model", "seed_cnn", "--epochs", "12", "--image-size", "32", "--batch-size", "8",
                   "--class-weights", "auto", "--subgroups", "site", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["per_class"]["effusion"]["unknown"] > 0
    assert metrics["auc"] > 0.8, metrics
    report = json.loads((run / "report.json").read_text())
    assert set(report["discrimination"]["per_class"]) == {"nodule", "effusion"} and report["subgroups"]["site"]
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    labels = {Path(r["image"]).name: r["label"] for r in rows}
    assert labels and all(("effusion?" in v) == (int(k[:-4]) % 7 == 0) for k, v in labels.items())  # unrecorded stay unknown
    proc = meddiag("predict", str(run), str(manifest.parent / "0.png"))
    assert proc.returncode == 0 and "prob_nodule" in proc.stdout


def test_chestmnist_by_name_is_multilabel(tmp_path, monkeypatch):
    """The official ChestMNIST layout (labels (N, 14)) loads as a 14-finding multi-label task."""
    from meddiag.data import medmnist
    from meddiag.data.download import md5sum

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 6), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14)).astype(np.uint8)
    np.savez(tmp_path / "chestmnist.npz", **arrays)
    monkeypatch.setattr(medmnist.MedMNISTSpec, "md5", property(lambda self: md5sum(tmp_path / "chestmnist.npz")))
    data = medmnist.load_medmnist(medmnist.parse_medmnist("chestmnist"), root=tmp_path)
    assert data.task == "multilabel" and len(data.class_names) == 14 and data.splits["train"].labels.shape == (20, 14)


def test_roc_curves_leave_unrecorded_findings_out_as_the_metrics_do():
    from meddiag.evaluation.plots import roc_series

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, (120, 2)).astype(float)
    probs = np.clip(y * 0.5 + rng.random((120, 2)) * 0.6, 0, 1)
    y[:40, 1] = np.nan
    metrics = classification_metrics(y, probs, "multilabel", ["a", "b"])
    series = {name: (fpr, tpr, auc) for name, fpr, tpr, auc in roc_series(y, probs, "multilabel", ["a", "b"])}
    for name in ("a", "b"):
        fpr, tpr, auc = series[name]
        assert auc == pytest.approx(metrics["per_class"][name]["auc"])
        assert np.trapezoid(tpr, fpr) == pytest.approx(auc)  # the curve drawn is the one whose area is reported


def test_multilabel_cross_validation_stratifies_by_finding(tmp_path):
    from test_end_to_end import meddiag

    manifest = _multilabel_manifest(tmp_path / "data", n=60)
    run = tmp_path / "cv"
    proc = meddiag("train", str(manifest), "--model", "seed_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
                   "--folds", "2", "--out", str(run), "--no-progress")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    summary = json.loads((run / "cv_metrics.json").read_text())
    assert summary["folds"] == 2 and len(summary["fold_runs"]) == 2
