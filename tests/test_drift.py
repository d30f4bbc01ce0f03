"""Dataset shift: the two-sample tests hold their level and find shifts; ``meddiag drift`` on a batch of files;
the server's rolling window at ``GET /v1/drift``."""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, run_meddiag as cli, synthetic_image


def write(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory) -> Path:
    """seed_cnn on 800 synthetic images; its validation split (80) is the shift reference."""
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    base = tmp_path_factory.mktemp("drift-run")
    data = make_image_folder(base / "images", per_class=400)
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=6, image_size=32, batch_size=32, out=str(base / "run"),
                         model_kwargs={"widths": [8, 16, 32], "dense": 64})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_and_evaluate(config, progress=False)
    return base / "run"


def test_the_tests_hold_their_level_and_find_a_shift():
    from meddiag.evaluation.drift import class_shift_test, mmd_test

    rng = np.random.default_rng(0)
    null_p, shifted_p, class_null, class_shifted = [], [], [], []
    for _ in range(40):
        reference = rng.normal(size=(200, 16))
        null_p.append(mmd_test(reference, rng.normal(size=(60, 16)), 199, seed=int(rng.integers(1e9)))["p_value"])
        moved = rng.normal(size=(60, 16)) + np.r_[0.8 * np.ones(4), np.zeros(12)]
        shifted_p.append(mmd_test(reference, moved, 199, seed=int(rng.integers(1e9)))["p_value"])
        ref_classes = np.eye(3)[rng.choice(3, 200, p=[0.5, 0.3, 0.2])]
        class_null.append(class_shift_test(ref_classes, np.eye(3)[rng.choice(3, 60, p=[0.5, 0.3, 0.2])], 199)["p_value"])
        class_shifted.append(class_shift_test(ref_classes, np.eye(3)[rng.choice(3, 60, p=[0.2, 0.3, 0.5])], 199)["p_value"])
    # under no shift a p-value is uniform: about 5% below 0.05 (at most 5 of 40 here), and never stuck at 1
    assert np.mean(np.array(null_p) < 0.05) <= 0.125 and 0.3 < np.median(null_p) < 0.7
    assert np.mean(np.array(class_null) < 0.05) <= 0.125
    assert np.mean(np.array(shifted_p) < 0.01) >= 0.9
    assert np.mean(np.array(class_shifted) < 0.01) >= 0.9
    assert min(shifted_p) >= 1 / 200  # a permutation p-value is never 0


def test_drift_finds_unfamiliar_batches_and_passes_familiar_ones(drift_run, tmp_path):
    rng = np.random.default_rng(5)
    familiar = make_image_folder(tmp_path / "familiar", per_class=40, seed=5)  # new images of the same distribution
    noise = tmp_path / "noise"
    noise.mkdir()
    for i in range(30):
        write(noise / f"n{i:02d}.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    write(noise / "broken.png", np.zeros((4, 4), np.uint8)).write_bytes(b"not a png")

    same = cli("drift", str(drift_run), str(familiar), "--out", str(tmp_path / "same"))
    assert same.returncode == 0, same.stderr
    assert same.stdout.startswith("no shift detected: p = ")
    record = json.loads((tmp_path / "same" / "drift.json").read_text())
    assert record["result"]["shift"] is False and record["result"]["p_value"] > 0.05 and record["n_inputs"] == 80
    assert set(record["result"]["tests"]) == {"features", "predicted_classes", "flagged"}
    assert record["result"]["tests"]["features"]["space"] == "penultimate features"

    far = cli("drift", str(drift_run), str(noise))
    assert far.returncode == 1  # the broken file is named; the other 30 are tested
    assert "shift detected" in far.stdout and "broken.png" in far.stderr
    folder = drift_run / "drift"
    record = json.loads((folder / "drift.json").read_text())
    assert record["result"]["shift"] is True and record["result"]["p_value"] < 0.01 and record["n_inputs"] == 30
    assert record["failures"][0]["path"].endswith("broken.png")
    assert record["atypical"][0]["ood"] is True and Path(record["atypical"][0]["path"]).parent == noise
    page = (folder / "drift.html").read_text()
    assert "shift detected" in page and "Most atypical inputs" in page and "data:image/png;base64," in page
    scores = list(csv.DictReader(open(folder / "drift_scores.csv")))
    assert len(scores) == 30 and float(scores[0]["ood_score"]) >= float(scores[-1]["ood_score"])


def test_drift_takes_a_manifest_and_refuses_what_it_cannot_test(drift_run, tmp_path):
    rng = np.random.default_rng(3)
    for i in range(12):
        write(tmp_path / f"c{i}.png", 255 - synthetic_image(i % 2, rng))
    (tmp_path / "new.csv").write_text("path,site\n" + "".join(f"c{i}.png,B\n" for i in range(12)))
    out = cli("drift", str(drift_run), str(tmp_path / "new.csv"), "--out", str(tmp_path / "m"))
    assert out.returncode == 0 and "shift detected" in out.stdout, out.stderr
    few = cli("drift", str(drift_run), str(tmp_path / "c0.png"), str(tmp_path / "c1.png"))
    assert few.returncode == 2 and "2 input(s) could be read" in few.stderr and "at least 10" in few.stderr
    (tmp_path / "bad.csv").write_text("file\nc0.png\n")
    bad = cli("drift", str(drift_run), str(tmp_path / "bad.csv"))
    assert bad.returncode == 2 and "bad.csv has no 'path' column" in bad.stderr
    assert cli("drift", str(drift_run), str(tmp_path), "--alpha", "2").returncode == 2


def test_a_run_without_a_shift_reference_says_how_to_make_one(drift_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(drift_run, old)
    ckpt_path = old / "checkpoints" / "best.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "shift" not in k}
    torch.save(ckpt, ckpt_path)
    images = drift_run.parent / "images"
    out = cli("drift", str(old), str(images))
    assert out.returncode == 2 and "has no shift reference" in out.stderr and "meddiag calibrate-ood" in out.stderr
    assert cli("calibrate-ood", str(old)).returncode == 0
    again = cli("drift", str(old), str(images / "normal"))  # one class only: the predicted classes have shifted
    assert again.returncode == 0 and "shift detected" in again.stdout
    classes = json.loads((old / "drift" / "drift.json").read_text())["result"]["tests"]["predicted_classes"]
    assert classes["p_value"] < 0.01 and classes["batch_share"]["normal"] > 0.9


def test_the_server_keeps_a_rolling_window(drift_run):
    from fastapi.testclient import TestClient

    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(11)
    with TestClient(create_app(Predictor.from_run(drift_run), drift_run, ServeOptions(drift_window=40))) as client:
        assert client.get("/v1/model").json()["drift"] == {"window": 40, "route": "/v1/drift"}
        assert client.get("/v1/drift").json()["status"] == "collecting"  # the warm-up pass is not a case
        familiar = [("files", (f"f{i}.png", png(synthetic_image(i % 2, rng)), "image/png")) for i in range(40)]
        assert client.post("/v1/predict", files=familiar).status_code == 200
        calm = client.get("/v1/drift").json()
        assert calm["in_window"] == 40 and calm["shift"] is False and calm["p_value"] > 0.05, calm
        noise = [("files", (f"n{i}.png", png(rng.integers(0, 256, (40, 40), dtype=np.uint8)), "image/png")) for i in range(40)]
        for start in (0, 20):
            assert client.post("/v1/predict", files=noise[start : start + 20]).status_code == 200
        alarm = client.get("/v1/drift").json()
        assert alarm["inputs_seen"] == 80 and alarm["in_window"] == 40 and alarm["shift"] is True and alarm["p_value"] < 0.01
        assert "path" not in json.dumps(alarm) and "n0.png" not in json.dumps(alarm)  # the window keeps no file names
    with TestClient(create_app(Predictor.from_run(drift_run), drift_run, ServeOptions(drift_window=0))) as client:
        assert client.get("/v1/drift").status_code == 404 and client.get("/v1/model").json()["drift"] is None
