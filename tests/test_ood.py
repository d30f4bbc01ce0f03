"""Inputs unlike the training data: the OOD reference and rule made at training, and the flag in
predict, serve, the report, and for runs made before the rule existed."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, run_meddiag as cli, synthetic_image


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory) -> Path:
    """seed_cnn on 300 synthetic images (30 for validation, where the OOD threshold is chosen)."""
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    base = tmp_path_factory.mktemp("ood-run")
    data = make_image_folder(base / "images", per_class=150)
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=8, image_size=32, batch_size=16, out=str(base / "run"),
                         model_kwargs={"widths": [8, 16, 32], "dense": 64})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_and_evaluate(config, progress=False)
    (base / "train.log").write_text("\n".join(str(w.message) for w in caught))
    return base / "run"


def test_the_feature_reference_scores_far_points_higher_and_the_threshold_keeps_its_share():
    from meddiag.models.ood import FeatureReference, keep_threshold

    rng = np.random.default_rng(0)

    def familiar(n: int, labels: np.ndarray) -> np.ndarray:  # training features live in the first 8 dimensions
        return np.concatenate([rng.normal(size=(n, 8)) + 3 * labels[:, None] * np.eye(8)[0], 0.05 * rng.normal(size=(n, 8))], 1)

    labels = rng.integers(0, 2, 600)
    reference = FeatureReference.fit(familiar(600, labels), labels, 2)
    near = torch.from_numpy(familiar(200, rng.integers(0, 2, 200)))
    far = torch.from_numpy(np.concatenate([0.05 * rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 3], 1))
    for method in ("mahalanobis", "knn"):
        s_near, s_far = reference.scores(near)[method], reference.scores(far)[method]
        threshold = keep_threshold(s_near, 0.95)
        assert 0.93 <= np.mean(s_near <= threshold) <= 0.97
        assert np.mean(s_far > threshold) > 0.95, method
    state = reference.state()
    assert FeatureReference.from_state(state).scores(far)["mahalanobis"] == pytest.approx(reference.scores(far)["mahalanobis"])
    assert FeatureReference.from_state({}) is None


def test_the_threshold_keeps_its_share_of_new_inputs_even_from_a_small_validation_split():
    from meddiag.models.ood import keep_threshold

    rng = np.random.default_rng(1)
    for n in (20, 30, 100):
        kept = [np.mean(rng.normal(size=5000) <= keep_threshold(rng.normal(size=n), 0.95)) for _ in range(400)]
        assert np.mean(kept) >= 0.945, n  # split-conformal: at least 95% on average over validation draws
    assert keep_threshold(np.array([1.0, np.nan, 2.0]), 0.5) == 2.0 and keep_threshold(np.array([np.nan]), 0.9) == np.inf


def test_pixel_statistics_see_what_features_may_not():
    from meddiag.models.ood import FeatureReference, all_scores, combined_score

    rng = np.random.default_rng(2)
    images = torch.from_numpy(np.stack([synthetic_image(i % 2, rng)[None] for i in range(300)]))
    blurred = torch.nn.functional.avg_pool2d(images[:100].float(), 5, 1, 2, count_include_pad=False).round().byte()
    labels = np.arange(300) % 2
    features = rng.normal(size=(300, 8))
    reference = FeatureReference.fit(features[:200], labels[:200], 2, images=images[:200])
    ok, far = reference.pixel_scores(images[200:]), reference.pixel_scores(blurred)
    assert np.mean(far > np.quantile(ok, 0.95)) > 0.95  # blur removes edges and texture
    again = FeatureReference.from_state(reference.state())
    assert again.pixel_scores(blurred) == pytest.approx(far)
    logits, f = torch.zeros(100, 2), torch.from_numpy(features[200:])
    scores = all_scores(logits, f, reference, "binary", images=images[200:], scales={"mahalanobis": 10.0, "pixels": 20.0})
    assert scores["combined"] == pytest.approx(combined_score(scores, {"mahalanobis": 10.0, "pixels": 20.0}))
    assert np.all(scores["combined"] >= scores["pixels"] / 20 - 1e-12)
    assert "pixels" not in all_scores(logits, f, reference, "binary")  # no images, no pixel score
    old = FeatureReference(reference.means, reference.precision, reference.bank)  # a reference made before pixel statistics
    assert np.isnan(old.pixel_scores(blurred)).all()


@pytest.mark.parametrize(("model", "dims"), [("seed_cnn", 2), ("resnet18", 2), ("densenet121", 2), ("efficientnet_b0", 2),
                                           ("seed_cnn", 3), ("resnet18", 3)])
def test_features_come_from_the_same_pass_as_the_logits(model, dims):
    from meddiag.models.checkpoint import ModelCard
    from meddiag.models.ood import logits_and_features

    size = 28 if dims == 2 else 24
    card = ModelCard(model_name=model, class_names=["a", "b"], task="binary", image_size=size, in_channels=1, spatial_dims=dims)
    net = card.build_model().eval()
    images = torch.randint(0, 255, (3, 1) + (size,) * dims, dtype=torch.uint8)
    logits, features = logits_and_features(net, card, images)
    from meddiag.models.inference import predict_proba

    assert torch.allclose(torch.softmax(logits, 1), predict_proba(net, images, "binary", 0.5, 0.5), atol=1e-5)
    assert features.shape[0] == 3 and features.shape[1] >= 32


def write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_a_trained_run_flags_what_it_has_never_seen(ood_run, tmp_path):
    from meddiag.models.checkpoint import load_checkpoint

    _, card = load_checkpoint(ood_run / "checkpoints" / "best.ckpt")
    assert "the OOD threshold rests on 30 validation images" in (ood_run.parent / "train.log").read_text()
    assert card.ood is not None and card.ood.method == "combined" and card.ood.keep == 0.95
    assert set(card.ood.scales) == {"mahalanobis", "pixels"} and card.ood.scales["pixels"] == card.ood.thresholds["pixels"]
    assert card.ood.val_flagged <= 0.10 and set(card.ood.thresholds) == {"mahalanobis", "knn", "energy", "msp", "pixels", "combined"}
    rng = np.random.default_rng(7)
    familiar = [write(tmp_path / f"ok{i}.png", synthetic_image(i % 2, rng)) for i in range(40)]
    noise = write(tmp_path / "noise.png", rng.integers(0, 256, (40, 40), dtype=np.uint8))
    inverted = write(tmp_path / "inverted.png", 255 - synthetic_image(1, rng))
    constant = write(tmp_path / "constant.png", np.full((40, 40), 90, np.uint8))
    colour = write(tmp_path / "colour.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    tiny = write(tmp_path / "tiny.png", synthetic_image(1, rng, size=6))
    out = cli("predict", str(ood_run), *map(str, familiar + [noise, inverted, constant, colour, tiny]), "--output", str(tmp_path / "p.csv"))
    assert out.returncode == 0, out.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert sum(rows[f.name]["ood"] == "1" for f in familiar) <= 8  # 5% expected; 30 validation images set the threshold
    for name in ("noise.png", "inverted.png", "constant.png", "colour.png", "tiny.png"):
        assert rows[name]["ood"] == "1" and rows[name]["abstain"] == "1" and rows[name]["ood_reason"], rows[name]
    assert "constant" in rows["constant.png"]["ood_reason"]
    assert "a colour image; this model was trained on grayscale images" in rows["colour.png"]["ood_reason"]
    assert "only 6x6 pixels" in rows["tiny.png"]["ood_reason"]
    assert "combined (features or pixel statistics) score" in rows["noise.png"]["ood_reason"]
    assert "x their own thresholds" in rows["noise.png"]["ood_reason"] and "pixel statistics " in rows["noise.png"]["ood_reason"]
    assert all(float(r["ood_score"]) >= 0 for r in rows.values())


def test_the_report_counts_flagged_test_inputs(ood_run):
    ood = json.loads((ood_run / "ood.json").read_text())
    assert ood["n"] == ood["all"]["n"] and ood["not_flagged"]["n"] == ood["n"] - ood["flagged"]
    assert ood["flagged_share"] <= 0.2
    assert "Inputs unlike the training data" in (ood_run / "report.html").read_text()


def test_a_run_made_before_the_rule_gets_one_without_retraining(small_run, tmp_path):
    import shutil

    from meddiag.models.checkpoint import load_checkpoint, load_ood_state, update_card

    old = tmp_path / "old"
    shutil.copytree(small_run, old)
    ckpt_path = old / "checkpoints" / "best.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ood.")}
    torch.save(ckpt, ckpt_path)
    update_card(ckpt_path, ood=None)
    image = next((small_run.parent / "images" / "normal").glob("*.png"))
    before = cli("predict", str(old), str(image))
    assert before.returncode == 0 and before.stdout.splitlines()[1].split(",")[-5] == ""  # no score without a rule
    out = cli("calibrate-ood", str(old), "--method", "knn", "--keep", "0.9")
    assert out.returncode == 0 and "OOD rule: knn score above" in out.stdout, out.stderr
    _, card = load_checkpoint(ckpt_path)
    assert card.ood.method == "knn" and card.ood.keep == 0.9 and load_ood_state(ckpt_path)
    wrong = cli("calibrate-ood", str(old), "--method", "bogus")
    assert wrong.returncode == 2 and "unknown OOD method 'bogus'" in wrong.stderr


def test_serve_returns_the_flag(small_run):
    from fastapi.testclient import TestClient

    from meddiag.serving.app import create_app
    from meddiag.serving.predictor import Predictor

    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(buffer, format="PNG")
    with TestClient(create_app(Predictor.from_run(small_run), small_run)) as client:
        assert client.get("/v1/model").json()["ood"]["method"] == "combined"
        result = client.post("/v1/predict", files=[("files", ("flat.png", buffer.getvalue(), "image/png"))]).json()["results"][0]
        assert result["ood"] is True and "constant" in result["ood_reason"] and result["abstain"] is True
        assert "ood_score" in result
