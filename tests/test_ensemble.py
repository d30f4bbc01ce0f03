"""Deep ensembles: a run folder like any other, whose probabilities are the members' mean."""

import csv
import json

import pytest

from conftest import make_image_folder
from test_end_to_end import meddiag


def _train(data, run, seed):
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "4", "--image-size", "32", "--batch-size", "8",
                   "--seed", str(seed), "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr


def test_ensemble_averages_members_and_works_everywhere(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=30)
    _train(data, tmp_path / "a", 0)
    # Same data and split seed, different initialisation: a second member.
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "4", "--image-size", "32", "--batch-size", "8",
                   "--out", str(tmp_path / "b"), "--no-progress", "--lr", "0.0005")
    assert proc.returncode == 0, proc.stderr
    ens = tmp_path / "ens"
    proc = meddiag("ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(ens), "--coverage", "0.9")
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of 2" in proc.stdout
    for name in ("metrics.json", "report.html", "predictions.csv", "ensemble.json", "checkpoints/best.ckpt"):
        assert (ens / name).exists(), name

    image = data / "pneumonia" / "img000.png"
    probs = []
    for run in (tmp_path / "a", tmp_path / "b", ens):
        proc = meddiag("predict", str(run), str(image))
        assert proc.returncode == 0, proc.stderr
        probs.append(float(next(csv.DictReader(proc.stdout.splitlines()))["prob_pneumonia"]))
    assert probs[2] == pytest.approx((probs[0] + probs[1]) / 2, abs=2e-6)

    proc = meddiag("explain", str(ens), str(image), "--out", str(tmp_path / "maps"))
    assert proc.returncode == 0, proc.stderr and (tmp_path / "maps" / "img000_gradcam.png").exists()
    assert json.loads((ens / "report.json").read_text())["selective_prediction"]["rule"]["abstain_above"] is not None


def test_members_of_different_data_are_refused(tmp_path):
    _train(make_image_folder(tmp_path / "d1", per_class=20), tmp_path / "a", 0)
    _train(make_image_folder(tmp_path / "d2", per_class=20, seed=3), tmp_path / "b", 0)
    proc = meddiag("ensemble", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "different data or splits" in proc.stderr
