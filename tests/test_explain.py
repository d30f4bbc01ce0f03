"""Explanations: heatmaps where the evidence is, sanity checks that can tell, figures for every input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 64
SIGNAL = (18, 44)  # (row, column) of the lesion that makes an image positive


def _lesion_image(positive: bool, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Noise and a large distractor blob anywhere; positives also carry a small bright square at SIGNAL."""
    img = rng.normal(70, 12, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(10, size - 10, 2)
    img += 90 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 60)
    if positive:
        r, c = SIGNAL
        img[r - 3 : r + 3, c - 3 : c + 3] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    root = tmp_path_factory.mktemp("lesion")
    rng = np.random.default_rng(0)
    for label in ("healthy", "lesion"):
        (root / "data" / label).mkdir(parents=True)
        for i in range(100):
            Image.fromarray(_lesion_image(label == "lesion", rng)).save(root / "data" / label / f"{i}.png")
    config = TrainConfig(data=str(root / "data"), model="seed_cnn", epochs=15, image_size=SIZE, batch_size=16,
                         out=str(root / "run"))
    result = train_and_evaluate(config, progress=False)
    assert result.test_metrics["auc"] > 0.95, result.test_metrics
    from meddiag.models import load_checkpoint

    model, card = load_checkpoint(result.train.best_checkpoint)
    test = np.stack([_lesion_image(True, rng)[None] for _ in range(12)])
    return root, model, card, torch.from_numpy(test)


def _peak_near_signal(maps: np.ndarray, radius: float = 5.0) -> float:
    hits = []
    for m in maps:
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        hits.append(np.hypot(r - SIGNAL[0], c - SIGNAL[1]) <= radius)
    return float(np.mean(hits))


def test_gradcam_peak_falls_on_the_lesion_and_not_for_a_randomised_model(lesion_run):
    from meddiag.explain.saliency import saliency_maps
    from meddiag.explain.sanity import _reinitialise, blocks

    _, model, card, images = lesion_run
    lesion = card.class_names.index("lesion")
    maps = saliency_maps(model, card, images, "gradcam", [lesion] * len(images))
    assert maps.shape == (12, SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
    assert _peak_near_signal(maps) >= 0.8
    import copy

    hits = []
    for seed in range(3):  # seeded, and over several random models: one draw alone decides nothing
        torch.manual_seed(seed)
        random_model = copy.deepcopy(model)
        for _, block in blocks(random_model):
            _reinitialise(block)
        hits.append(_peak_near_signal(saliency_maps(random_model, card, images, "gradcam", [lesion] * len(images))))
    assert np.mean(hits) <= 0.4, hits


@pytest.mark.parametrize("method", ["gradcampp", "hirescam", "occlusion"])
def test_other_methods_also_find_the_lesion(lesion_run, method):
    from meddiag.explain.saliency import saliency_maps

    _, model, card, images = lesion_run
    maps = saliency_maps(model, card, images[:6], method, [card.class_names.index("lesion")] * 6)
    assert _peak_near_signal(maps) >= 0.8


def test_sanity_checks_pass_for_a_trained_model(lesion_run):
    from meddiag.explain.sanity import deletion_test, randomisation_test

    _, model, card, images = lesion_run
    rand = randomisation_test(model, card, images[:8])
    assert [s["randomised_down_to"] for s in rand["stages"]][0] == "classifier.3" and rand["stages"][-1]["randomised_down_to"] == "features.0"
    assert rand["passes"] and rand["spearman_fully_random"] < 0.3
    deletion = deletion_test(model, card, images[:8], steps=10, random_maps=2)
    assert deletion["passes"] and deletion["deletion_auc"] < deletion["random_deletion_auc"]


def test_a_constant_map_fails_the_deletion_check(lesion_run):
    """The check has teeth: a map that ranks pixels arbitrarily is no better than random ones."""
    from meddiag.explain.sanity import deletion_curve

    _, model, card, images = lesion_run
    classes = [card.class_names.index("lesion")] * 8
    anti = np.zeros((8, SIZE, SIZE))
    anti[:, SIGNAL[0] - 3 : SIGNAL[0] + 3, SIGNAL[1] - 3 : SIGNAL[1] + 3] = -1  # lesion deleted last
    good = np.zeros((8, SIZE, SIZE))
    good[:, SIGNAL[0] - 3 : SIGNAL[0] + 3, SIGNAL[1] - 3 : SIGNAL[1] + 3] = 1  # lesion deleted first
    area = lambda m: deletion_curve(model, card, images[:8], m, classes, 10).mean()  # noqa: E731
    assert area(good) < area(anti)


def test_explain_command_writes_a_figure_per_image_and_names_bad_files(lesion_run, tmp_path):
    from test_end_to_end import meddiag

    root, _, _, _ = lesion_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "maps"
    proc = meddiag("explain", str(root / "run"), str(root / "data" / "lesion" / "0.png"), str(bad),
                   "--method", "gradcampp", "--class", "healthy", "--out", str(out))
    assert proc.returncode == 1 and "broken.png" in proc.stderr
    figure = out / "0_gradcampp.png"
    assert figure.exists()
    with Image.open(figure) as im:
        assert im.width > 400
    assert "0.png: predicted" in proc.stdout and "healthy" in proc.stdout
    some = tmp_path / "some"
    some.mkdir()
    for name in ("1.png", "2.png", "3.png"):
        (some / name).write_bytes((root / "data" / "healthy" / name).read_bytes())
    proc = meddiag("predict", str(root / "run"), str(some), "--explain", str(tmp_path / "pred_maps"), "--output", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "pred_maps").glob("*.png")) == ["1_gradcam.png", "2_gradcam.png", "3_gradcam.png"]


def test_volume_explanations_show_three_planes(tmp_path):
    import nibabel as nib

    from meddiag.explain.files import explain_files
    from meddiag.models import create_model
    from meddiag.models.checkpoint import ModelCard

    card = ModelCard(model_name="resnet18", class_names=["a", "b"], task="binary", image_size=24, in_channels=1, spatial_dims=3)
    model = create_model("resnet18", 1, 2, 3, 24)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 24, 16)).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    results, failures = explain_files(model, card, [tmp_path / "v.nii.gz"], tmp_path / "out")
    assert not failures and results[0].figure.name == "v_gradcam.png" and results[0].figure.exists()


def test_sanity_command_writes_json_and_the_report_shows_it(lesion_run):
    from test_end_to_end import meddiag

    root, _, _, _ = lesion_run
    run = root / "run"
    proc = meddiag("explain", str(run), "--sanity", "--images", "8")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((run / "sanity.json").read_text())
    assert result["n_images"] == 8 and result["randomisation"]["passes"] and result["deletion"]["passes"]
    assert "passes" in proc.stdout and "FAILS" not in proc.stdout
    proc = meddiag("report", str(run), "--resamples", "200")
    assert proc.returncode == 0, proc.stderr
    page = (run / "report.html").read_text()
    assert "id='explanations'" in page and "Spearman" in page


def test_the_report_shows_where_the_model_looked_on_its_surest_true_positives(small_run):
    from PIL import Image

    figure = small_run / "plots" / "example_heatmaps.png"
    assert figure.exists() and Image.open(figure).size[0] > 400
    page = (small_run / "report.html").read_text()
    assert "surest show the finding" in page and page.count("data:image/png;base64") >= 5
