"""Uncertainty and abstention: entropy, TTA and MC-dropout passes, thresholds for a coverage, risk-coverage."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from meddiag.errors import ModelError
from meddiag.evaluation.stats import abstention_threshold, risk_coverage
from meddiag.models import create_model
from meddiag.models.checkpoint import ModelCard
from meddiag.models.uncertainty import normalised_entropy, predictive_samples, summarise


def test_normalised_entropy_by_hand():
    assert normalised_entropy(np.array([[0.5, 0.5], [1.0, 0.0]]), "binary") == pytest.approx([1.0, 0.0], abs=1e-9)
    third = np.full((1, 3), 1 / 3)
    assert normalised_entropy(third, "multiclass")[0] == pytest.approx(1.0)
    p = np.array([[0.9, 0.1, 0.0]])
    assert normalised_entropy(p, "multiclass")[0] == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(3), rel=1e-6)
    assert normalised_entropy(np.array([[0.5, 1.0]]), "multilabel")[0] == pytest.approx(0.5, abs=1e-9)


def test_threshold_for_a_coverage_and_the_risk_coverage_curve():
    u = np.arange(10) / 10.0
    t = abstention_threshold(u, 0.8)
    assert (u <= t).mean() == 0.8
    errors = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])  # the two most uncertain are the two mistakes
    curve = risk_coverage(errors, u)
    assert curve["error_at"] == {"100": 0.2, "90": pytest.approx(1 / 9), "80": 0.0}
    with pytest.raises(ValueError):
        abstention_threshold(u, 0)


def _card(name: str, **kw) -> ModelCard:
    return ModelCard(model_name=name, class_names=["a", "b"], task="binary", image_size=32, in_channels=1, **kw)


def test_tta_passes_differ_and_mc_dropout_needs_dropout():
    torch.manual_seed(0)
    model = create_model("resnet18", 1, 2, 2, 32).eval()
    images = torch.randint(0, 255, (4, 1, 32, 32), dtype=torch.uint8)
    samples = predictive_samples(model, _card("resnet18"), images, tta=3)
    assert samples.shape == (4, 4, 2) and not np.allclose(samples[0], samples[1])
    out = summarise(samples, "binary")
    assert out["mean"].shape == (4, 2) and (out["spread"] > 0).all()
    with pytest.raises(ModelError, match="no dropout"):
        predictive_samples(model, _card("resnet18"), images, mc_dropout=2)

    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 2))

        def forward(self, x):
            return self.body(x)

    net = WithDropout().eval()
    mc = predictive_samples(net, _card("seed_cnn"), images, mc_dropout=5)
    assert mc.shape == (6, 4, 2) and summarise(mc, "binary")["spread"].max() > 0
    assert not net.training and not net.body[3].training  # dropout switched off again afterwards


def test_train_with_coverage_predicts_an_abstain_column_and_reports_risk_coverage(tmp_path):
    from conftest import make_image_folder
    from meddiag.models import load_checkpoint
    from test_end_to_end import meddiag

    data = make_image_folder(tmp_path / "data", per_class=40)
    run = tmp_path / "run"
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "6", "--image-size", "32", "--batch-size", "8",
                   "--coverage", "0.8", "--tta", "2", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    card = load_checkpoint(run / "checkpoints" / "best.ckpt")[1]
    assert card.coverage == 0.8 and card.abstain_threshold is not None and card.tta == 2
    report = json.loads((run / "report.json").read_text())
    rule = report["selective_prediction"]["rule"]
    assert rule["abstain_above"] == pytest.approx(card.abstain_threshold) and 0 < rule["coverage"] <= 1
    assert "selective-prediction" in (run / "report.html").read_text()
    proc = meddiag("predict", str(run), str(data / "normal"), str(data / "pneumonia"), "--output", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert {r["abstain"] for r in rows} <= {"0", "1"} and all(r["spread"] != "" for r in rows)
    threshold, judged = card.abstain_threshold, 0
    for r in rows:  # the CSV keeps 4 significant digits; a value that rounds onto the threshold cannot be judged
        u = float(r["uncertainty"])
        if abs(u - threshold) > 1e-3 * threshold:
            assert (r["abstain"] == "1") == (u > threshold or r["ood"] == "1"), (r, threshold)
            judged += 1
    assert judged >= len(rows) // 2


def test_mc_dropout_with_a_registered_network_that_has_dropout():
    torch.manual_seed(0)
    model = create_model("efficientnet_b0", 1, 2, 2, 32).eval()
    for p in model.parameters():  # MONAI's initialisation gives equal logits; any trained model would not
        p.data.normal_(0, 0.1)
    images = torch.randint(0, 255, (3, 1, 32, 32), dtype=torch.uint8)
    samples = predictive_samples(model, _card("efficientnet_b0"), images, mc_dropout=4)
    assert samples.shape == (5, 3, 2) and summarise(samples, "binary")["spread"].max() > 0
