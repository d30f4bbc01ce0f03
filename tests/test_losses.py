"""Imbalance and missing labels: class weights, focal loss, balanced sampling, masked multi-label loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from meddiag.training.losses import DiagnosisLoss, auto_class_weights, balanced_sample_weights


def test_auto_class_weights_match_sklearn_balanced():
    labels = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels.numpy())
    np.testing.assert_allclose(auto_class_weights(labels, 3, "multiclass"), expected, rtol=1e-6)
    multi = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.0, 1.0], [0.0, 0.0]])
    assert auto_class_weights(multi, 2, "multilabel") == pytest.approx([3.0, 2.0])  # neg/pos over known entries


def test_weighted_and_focal_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 3), torch.randint(0, 3, (16,))
    w = [0.5, 1.0, 4.0]
    assert DiagnosisLoss("multiclass")(logits, labels) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    weighted = DiagnosisLoss("multiclass", weights=w)(logits, labels)
    assert weighted == pytest.approx(F.cross_entropy(logits, labels, weight=torch.tensor(w)).item(), rel=1e-6)
    assert DiagnosisLoss("multiclass", "focal", gamma=0.0)(logits, labels) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # By hand: p_t = 0.9 -> (0.1)^2 * -log(0.9); p_t = 0.6 -> (0.4)^2 * -log(0.6).
    easy_hard = torch.log(torch.tensor([[0.1, 0.9], [0.4, 0.6]]))
    focal = DiagnosisLoss("binary", "focal", gamma=2.0)(easy_hard, torch.tensor([1, 1]))
    assert focal == pytest.approx((0.01 * -np.log(0.9) + 0.16 * -np.log(0.6)) / 2, rel=1e-5)


def test_unknown_multilabel_targets_are_masked_not_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.0, -2.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan"), 0.0], [float("nan"), 1.0, 1.0]])
    loss = DiagnosisLoss("multilabel")(logits, labels)
    known = torch.isfinite(labels)
    expected = F.binary_cross_entropy_with_logits(logits[known], labels[known])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~known] == 0) and torch.all(logits.grad[known] != 0)
    as_negative = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels))
    assert loss.item() != pytest.approx(as_negative.item())


def test_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 900 + [1] * 100)
    weights = balanced_sample_weights(labels, "binary")
    draws = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = (labels[draws] == 1).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.02)
    multi = torch.tensor([[1.0, 0.0]] * 90 + [[0.0, 1.0]] * 10 + [[0.0, 0.0]] * 50)
    w = balanced_sample_weights(multi, "multilabel")
    draws = torch.multinomial(w, 30000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = [(multi[draws, 0] == 1).float().mean(), (multi[draws, 1] == 1).float().mean(), (multi[draws].sum(1) == 0).float().mean()]
    assert all(c.item() == pytest.approx(1 / 3, abs=0.02) for c in counts)


def test_imbalance_options_train_end_to_end(tmp_path):
    import json

    from conftest import make_image_folder
    from test_end_to_end import meddiag

    root = make_image_folder(tmp_path / "data", per_class=12)
    make_image_folder(tmp_path / "more", per_class=60, classes=("normal",), seed=1)
    for f in (tmp_path / "more" / "normal").iterdir():
        f.rename(root / "normal" / f"extra_{f.name}")
    run = tmp_path / "run"
    proc = meddiag("train", str(root), "--model", "seed_cnn", "--epochs", "8", "--image-size", "32", "--batch-size", "8",
                   "--class-weights", "auto", "--loss", "focal", "--sampler", "balanced", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    config = (run / "config.yaml").read_text()
    assert "class_weights: auto" in config and "loss: focal" in config and "sampler: balanced" in config
    assert json.loads((run / "metrics.json").read_text())["auc"] > 0.8
