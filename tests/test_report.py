"""The evaluation report: operating points chosen on validation and reported on test, subgroup gaps
flagged only when real, calibration stored and used, and a self-contained HTML page."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiag.evaluation import stats
from meddiag.evaluation.report import compute_report, newcombe_difference
from meddiag.evaluation.table import PredictionTable

CLASSES = ["normal", "disease"]


def _table(n: int, rng: np.random.Generator, separation: float = 2.0, site_b_random: bool = False) -> PredictionTable:
    labels = rng.integers(0, 2, n)
    site = np.where(np.arange(n) % 2 == 0, "A", "B")
    z = rng.normal(labels * separation, 1.0)
    if site_b_random:
        z = np.where(site == "B", rng.normal(0, 1.0, n), z)
    p = 1 / (1 + np.exp(-(z - separation / 2)))
    return PredictionTable([f"img{i}.png" for i in range(n)], labels, np.column_stack([1 - p, p]),
                           None, {"site": site.tolist()})


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Stat Med 17:873, table II, example (a): 56/70 - 48/80, method 10.
    d, lo, hi = newcombe_difference(56, 70, 48, 80)
    assert d == pytest.approx(0.2) and lo == pytest.approx(0.0524, abs=1e-4) and hi == pytest.approx(0.3339, abs=1e-4)


def test_operating_points_are_chosen_on_validation_and_reported_on_test():
    rng = np.random.default_rng(0)
    val, test = _table(400, rng), _table(600, rng)
    report = compute_report(test, val, task="binary", class_names=CLASSES, n_resamples=200)
    points = report["operating_points"]["disease"]
    assert set(points) == {"youden", "sens90", "sens95", "spec90", "checkpoint"}
    y_val, p_val = val.labels == 1, val.probs[:, 1]
    y, p = test.labels == 1, test.probs[:, 1]
    for rule in ("youden", "sens90", "sens95", "spec90"):
        t = stats.choose_threshold(y_val, p_val, rule)
        assert points[rule]["threshold"] == t and points[rule]["chosen_on"] == "val"
        tp = int(((p >= t) & y).sum())
        assert points[rule]["tp"] == tp and points[rule]["sensitivity"] == pytest.approx(tp / y.sum())
        lo, hi = points[rule]["sensitivity_ci"]
        assert lo < points[rule]["sensitivity"] < hi
    assert points["sens95"]["sensitivity"] > points["spec90"]["sensitivity"]
    assert points["checkpoint"]["tp"] == int(((p >= 0.5) & y).sum())
    d = report["discrimination"]
    assert d["auc_ci"][0] < d["auc"] < d["auc_ci"][1] and d["resampled"] == "images"


def test_subgroup_gaps_are_flagged_only_when_the_intervals_exclude_zero():
    rng = np.random.default_rng(1)
    fair = compute_report(_table(800, rng), None, task="binary", class_names=CLASSES, subgroups=["site"], n_resamples=300)
    assert all(not row["flagged"] for row in fair["subgroups"]["site"].values())
    biased = compute_report(_table(800, rng, site_b_random=True), None, task="binary", class_names=CLASSES,
                            subgroups=["site", "scanner"], n_resamples=300)
    rows = biased["subgroups"]["site"]
    assert "auc" in rows["B"]["flagged"] and rows["B"]["auc"] < 0.65 < rows["A"]["auc"]
    assert rows["B"]["auc_gap_ci"][1] < 0
    assert "no column 'scanner'" in biased["subgroups"]["scanner"]["error"]


def test_multiclass_report_has_macro_micro_and_one_vs_rest_points():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3)) + 2 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    table = PredictionTable([str(i) for i in range(300)], labels, probs)
    report = compute_report(table, table, task="multiclass", class_names=["a", "b", "c"], n_resamples=200)
    d = report["discrimination"]
    assert set(d["per_class"]) == {"a", "b", "c"} and d["macro_auc"] == pytest.approx(np.mean([v["auc"] for v in d["per_class"].values()]))
    assert d["micro_auc_ci"][0] < d["micro_auc"] < d["micro_auc_ci"][1]
    assert set(report["operating_points"]) == {"a", "b", "c"}
    assert report["decision_curve"] is None and report["calibration"]["model"]["of"] == "top-label confidence"
    assert len(report["failures"]["confident_errors"]) > 0


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids, self.sources, self.images = set(), [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if key in a and not a[key].startswith(("#", "data:")):
                self.sources.append(a[key])
        if tag == "img":
            self.images += 1


def _manifest(root: Path, n: int = 120, seed: int = 0) -> Path:
    """A manifest whose 'site' column matters (site B's images carry no signal) and whose
    'patient_name' column must never leave the data."""
    from PIL import Image

    from conftest import synthetic_image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        label = i % 2
        image = synthetic_image(label, rng, size=32)
        Image.fromarray(image).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": ["normal", "disease"][label], "site": "AB"[(i // 2) % 2],
                     "sex": "FM"[(i // 4) % 2], "patient_name": f"Doe^Jane{i}"})
    from conftest import write_csv

    return write_csv(root / "manifest.csv", rows)


def test_train_with_operating_point_calibration_and_subgroups_writes_the_report(tmp_path):
    from meddiag.models import load_checkpoint
    from test_end_to_end import meddiag

    manifest = _manifest(tmp_path / "data")
    run = tmp_path / "run"
    proc = meddiag("train", str(manifest), "--model", "seed_cnn", "--epochs", "6", "--image-size", "32", "--batch-size", "8",
                   "--operating-point", "sens90", "--calibrate", "--subgroups", "site,sex", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout and "95% CI" in proc.stdout
    card = load_checkpoint(run / "checkpoints" / "best.ckpt")[1]
    assert card.operating_point == "sens90" and card.threshold != 0.5 and card.temperature != 1.0

    # The threshold is the one the rule picks on the (calibrated) validation predictions.
    val = PredictionTable.read(run / "predictions_val.csv", card.class_names, card.task)
    assert card.threshold == pytest.approx(stats.choose_threshold(val.labels == 1, val.probs[:, 1], "sens90"), abs=1e-6)

    report = json.loads((run / "report.json").read_text())
    for key in ("data", "discrimination", "operating_points", "calibration", "decision_curve", "subgroups", "failures"):
        assert report[key], key
    assert report["calibration"]["temperature"] == pytest.approx(card.temperature)
    assert "before_temperature" in report["calibration"]
    assert set(report["subgroups"]) == {"site", "sex"} and set(report["subgroups"]["site"]) == {"A", "B"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threshold"] == card.threshold and len(metrics["auc_ci"]) == 2

    page = _Page()
    text = (run / "report.html").read_text()
    page.feed(text)
    assert {"model", "data", "discrimination", "operating-points", "calibration", "decision-curve", "subgroups",
            "failures"} <= page.ids
    assert page.sources == [] and "http://" not in text and "https://" not in text  # nothing fetched from a network
    assert page.images >= 5

    # Only the asked-for columns are written; other manifest columns (here a name) never are.
    for f in run.rglob("*"):
        if f.is_file():
            assert b"Doe^Jane" not in f.read_bytes(), f
    header = (run / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["site", "sex"]

    # predict applies the stored threshold and temperature.
    proc = meddiag("predict", str(run), str(manifest.parent / "0.png"), str(manifest.parent / "1.png"))
    assert proc.returncode == 0, proc.stderr
    for row in csv.DictReader(proc.stdout.splitlines()):
        expected = "disease" if float(row["prob_disease"]) >= card.threshold else "normal"
        assert row["prediction"] == expected

    # `meddiag report` rebuilds from the saved predictions (and re-evaluates for a new column).
    (run / "report.html").unlink()
    proc = meddiag("report", str(run), "--resamples", "200")
    assert proc.returncode == 0, proc.stderr
    assert (run / "report.html").exists() and json.loads((run / "report.json").read_text())["discrimination"]["n_resamples"] == 200


def test_operating_point_refuses_multiclass_and_unknown_rules(tmp_path):
    from meddiag.training.config import TrainConfig
    from meddiag.errors import ConfigError

    with pytest.raises(ConfigError, match="youden, sensNN or specNN"):
        TrainConfig.from_sources(None, data="x", operating_point="best")
    assert TrainConfig.from_sources(None, data="x", operating_point="spec95").operating_point == "spec95"


def test_temperature_in_the_card_changes_probabilities_not_decisions():
    from meddiag.models.inference import logits_to_probs

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    hot, cool = logits_to_probs(logits, "multiclass"), logits_to_probs(logits, "multiclass", temperature=2.0)
    assert cool.max() < hot.max() and cool.argmax() == hot.argmax()


def test_an_operating_point_that_misses_its_target_on_test_is_flagged_and_rendered():
    from meddiag.evaluation import html
    from meddiag.evaluation.report import INTENDED_USE

    rng = np.random.default_rng(4)
    val = _table(400, rng, separation=3.0)
    test = _table(400, rng, separation=0.8)  # a shifted test set: the validation threshold no longer holds
    report = compute_report(test, val, task="binary", class_names=CLASSES, n_resamples=200)
    points = report["operating_points"]["disease"]
    spec = points["spec90"]
    if spec["specificity_ci"][1] < 0.90:
        assert spec["target_missed"] and "misses the target 0.90" in spec["target_missed"]
    sens = points["sens90"]
    assert (sens["target_missed"] is not None) == (sens["sensitivity_ci"][1] < 0.90)
    assert any(p.get("target_missed") for p in points.values()), points  # the shift is large enough to miss one
    assert points["youden"]["target_missed"] is None  # Youden has no target
    page = html.render({**report, "title": "t", "generated": "2026-12-01 10:00 UTC", "meddiag_version": "0.1.0",
                        "intended_use": INTENDED_USE, "model": {"model": "m"}, "data": None,
                        "explanation_sanity": None, "split": "test"}, {})
    assert "missed:" in page and "Generated 2026-12-01 10:00 UTC" in page and "not a diagnosis on its own" in page
    assert "<th>truly +</th><td>TP" in page and "<th>property</th><th>value</th>" in page
