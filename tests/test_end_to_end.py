"""train -> evaluate -> predict through the real command line, as a user runs it (the shared run is trained by a
new ``python -m meddiag`` process; the other commands go through the same entry in this process)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_image_folder, run_meddiag, synthetic_image


def meddiag(*args: str, env: dict | None = None, cwd: Path | None = None, process: bool = False) -> subprocess.CompletedProcess:
    """``meddiag ARGS`` as a user types it: through the command line's entry in this process (``run_meddiag``),
    or with ``process=True`` as a new ``python -m meddiag`` process (for what only a process shows: several
    processes, a kill, the interpreter's start)."""
    env = {"MEDDIAG_DATA": os.environ.get("MEDDIAG_DATA", "/nonexistent"), **(env or {})}
    if not process:
        return run_meddiag(*args, env=env, cwd=cwd)
    return subprocess.run([sys.executable, "-m", "meddiag", *args], capture_output=True, text=True, env={**os.environ, **env},
                          cwd=cwd, timeout=600)


def no_traceback(proc: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """One small run on a synthetic two-class folder, shared by the tests below."""
    base = tmp_path_factory.mktemp("e2e")
    data = make_image_folder(base / "images", per_class=40)
    run = base / "run"
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "15", "--image-size", "32",
                   "--batch-size", "8", "--out", str(run), "--no-progress", process=True)
    assert proc.returncode == 0, proc.stderr
    return data, run, proc


def test_train_writes_a_complete_run_folder(trained_run):
    data, run, proc = trained_run
    for name in ["config.yaml", "data.json", "history.csv", "metrics.json", "predictions.csv",
                 "checkpoints/best.ckpt", "training.json", "splits/train.csv", "splits/val.csv",
                 "splits/test.csv", "plots/roc.png", "plots/confusion_matrix.png", "plots/training_curves.png"]:
        assert (run / name).exists(), name
    assert not (run / "checkpoints" / "last.ckpt").exists()  # the resume state goes once training has finished
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("test AUC") and str(run) in summary
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == list(range(1, len(history) + 1))
    assert {"train_loss", "val_auc", "val_acc", "lr", "time_s"} <= set(history[0])


def test_the_model_learns_the_synthetic_task(trained_run):
    _, run, _ = trained_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == 16
    assert metrics["auc"] >= 0.9, metrics
    assert set(metrics["per_class"]["pneumonia"]) >= {"sensitivity", "specificity", "ppv", "npv", "f1", "support"}


def test_config_yaml_is_resolved_and_reproduces(trained_run, tmp_path):
    _, run, _ = trained_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["image_size"] == 32 and config["model"] == "seed_cnn" and config["out"] == str(run)
    from meddiag.training import TrainConfig

    again = TrainConfig.from_sources(run / "config.yaml", out=str(tmp_path / "again"))
    assert again.model_dump(exclude={"out"}) == TrainConfig.model_validate(config).model_dump(exclude={"out"})


def test_evaluate_matches_what_train_reported(trained_run, tmp_path):
    _, run, _ = trained_run
    proc = meddiag("evaluate", str(run), "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    original = json.loads((run / "metrics.json").read_text())
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["auc"] == pytest.approx(original["auc"]) and again["acc"] == pytest.approx(original["acc"])
    proc = meddiag("evaluate", str(run), "--split", "val", "--out", str(tmp_path / "val"))
    assert proc.returncode == 0 and json.loads((tmp_path / "val" / "metrics.json").read_text())["split"] == "val"


def test_evaluate_a_checkpoint_file(trained_run, tmp_path):
    _, run, _ = trained_run
    proc = meddiag("evaluate", str(run / "checkpoints" / "best.ckpt"), "--split", "val", "--out", str(tmp_path / "ck"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text())["n_images"] == 8


def test_predict_files_and_folders(trained_run, tmp_path):
    data, run, _ = trained_run
    rng = np.random.default_rng(5)
    new = tmp_path / "new"
    new.mkdir()
    for label in (0, 1):
        Image.fromarray(synthetic_image(label, rng, size=60, rgb=True)).save(new / f"case{label}.jpg")
    out = tmp_path / "preds.csv"
    proc = meddiag("predict", str(run), str(new), str(data / "normal" / "img000.png"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"case0.jpg", "case1.jpg", "img000.png"}
    for row in rows.values():
        assert float(row["prob_normal"]) + float(row["prob_pneumonia"]) == pytest.approx(1, abs=1e-5)
    assert rows["case0.jpg"]["prediction"] == "normal" and rows["case1.jpg"]["prediction"] == "pneumonia"


def test_predict_reports_bad_files_by_name_and_fails(trained_run, tmp_path):
    data, run, _ = trained_run
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = meddiag("predict", str(run), str(tmp_path / "broken.png"), str(tmp_path / "missing.png"),
                   str(data / "pneumonia" / "img001.png"))
    assert proc.returncode == 1
    assert "broken.png" in proc.stderr and "missing.png" in proc.stderr and no_traceback(proc)
    assert "img001.png" in proc.stdout  # the good file is still predicted


@pytest.mark.parametrize("args, message", [
    (["train"], "give the DATA to train on"),
    (["train", "/no/such/folder"], "no such file or folder"),
    (["train", "pneumoniamnist", "--model", "resnet19"], "unknown model 'resnet19'"),
    (["evaluate", "/no/such/run"], "does not exist"),
    (["predict", "/no/such/run", "x.png"], "does not exist"),
])
def test_errors_are_one_clear_line(args, message):
    proc = meddiag(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("error:") and no_traceback(proc)


def test_a_command_in_this_process_prints_and_returns_what_a_new_process_does(trained_run, tmp_path):
    """The tests' in-process calls stand for ``python -m meddiag``: same stdout, stderr (warnings, errors) and exit code."""
    data, run, _ = trained_run
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for args in (("predict", str(run), str(data / "normal" / "img000.png"), str(tmp_path / "broken.png")),
                 ("evaluate", str(tmp_path / "nowhere")), ("train", "--epochs", "0")):
        here, there = meddiag(*args), meddiag(*args, process=True)
        assert (here.returncode, here.stdout, here.stderr) == (there.returncode, there.stdout, there.stderr), args
        assert here.returncode != 0 and here.stderr


def test_models_command_lists_models():
    proc = meddiag("models")
    assert proc.returncode == 0 and "seed_cnn" in proc.stdout and "efficientnet_b0" in proc.stdout


def test_real_pneumoniamnist_smoke_run(shared_medmnist, tmp_path):
    """One short run on the real shared file: the whole pipeline on real data, learning something."""
    run = tmp_path / "pneu"
    proc = meddiag("train", "pneumoniamnist", "--model", "seed_cnn", "--epochs", "1", "--out", str(run), "--no-progress",
                   env={"MEDDIAG_DATA": str(shared_medmnist)})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 624 and metrics["auc"] > 0.85


def test_two_process_ddp_on_cpu(tmp_path):
    """Lightning's DDP (gloo on CPU): the extra process joins the run; one evaluation, one summary."""
    data = make_image_folder(tmp_path / "images", per_class=16)
    run = tmp_path / "ddp"
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "2", "--image-size", "24", "--batch-size", "8",
                   "--accelerator", "cpu", "--devices", "2", "--out", str(run), "--no-progress", process=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("test AUC") == 1
    assert (run / "metrics.json").exists() and (run / "checkpoints" / "best.ckpt").exists()
    assert [r["epoch"] for r in csv.DictReader(open(run / "history.csv"))] == ["1", "2"]


def test_dicom_folder_train_and_predict_keep_the_window(tmp_path):
    from conftest import write_dicom

    rng = np.random.default_rng(1)
    for label, name in enumerate(["normal", "pneumonia"]):
        for i in range(24):
            # Stored values 0..1020; with intercept -1000 they are -1000..20 HU.
            write_dicom(tmp_path / "dcm" / name / f"{i}.dcm", synthetic_image(label, rng).astype(np.uint16) * 4,
                        RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=10, BodyPartExamined="CHEST")
    run = tmp_path / "run"
    proc = meddiag("train", str(tmp_path / "dcm"), "--model", "seed_cnn", "--epochs", "12", "--batch-size", "8",
                   "--image-size", "32", "--window", "-500,1100", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    from meddiag.models import load_checkpoint

    card = load_checkpoint(run / "checkpoints" / "best.ckpt")[1]
    assert card.window == "-500,1100" and card.modalities == ["CT"] and card.body_parts == ["CHEST"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["auc"] >= 0.9  # the files' own window (2000 +/- 5) would show a blank image
    proc = meddiag("predict", str(run), str(tmp_path / "dcm" / "pneumonia" / "0.dcm"))
    assert proc.returncode == 0 and "0.dcm,pneumonia" in proc.stdout
    # DICOM inputs stating another modality or body part than the training files' are flagged, with the reason
    pixels = synthetic_image(1, rng).astype(np.uint16) * 4
    write_dicom(tmp_path / "new" / "mr.dcm", pixels, Modality="MR", RescaleSlope=1, RescaleIntercept=-1000, BodyPartExamined="CHEST")
    write_dicom(tmp_path / "new" / "knee.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1000, BodyPartExamined="KNEE")
    write_dicom(tmp_path / "new" / "unstated.dcm", pixels, RescaleSlope=1, RescaleIntercept=-1000)
    proc = meddiag("predict", str(run), str(tmp_path / "new"), "--output", str(tmp_path / "new.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(open(tmp_path / "new.csv"))}
    assert rows["mr.dcm"]["ood"] == "1" and "a DICOM MR image; this model is for CT" in rows["mr.dcm"]["ood_reason"]
    assert rows["knee.dcm"]["ood"] == "1" and "body part KNEE; this model was trained on CHEST" in rows["knee.dcm"]["ood_reason"]
    assert "DICOM" not in rows["unstated.dcm"]["ood_reason"]  # no body part stated: nothing to compare


def test_3d_medmnist_train_then_predict_volumes(shared_medmnist, tmp_path):
    """Volumes end to end: a 3D model is chosen for 3D data; NIfTI files and a DICOM series are predicted."""
    from conftest import SHARED_DATA

    run = tmp_path / "adrenal"
    proc = meddiag("train", "adrenalmnist3d", "--model", "seed_cnn", "--epochs", "1", "--out", str(run), "--no-progress",
                   "--modalities", "ct", env={"MEDDIAG_DATA": str(shared_medmnist)})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 298 and metrics["class_names"] == ["normal", "hyperplasia"]
    from meddiag.models import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "best.ckpt")[1].spatial_dims == 3
    nifti, series = SHARED_DATA / "nifti" / "niivue", SHARED_DATA / "dicom" / "vs_seg_001_t1_series"
    proc = meddiag("predict", str(run), str(nifti / "CT_pitch.nii.gz"), str(series),
                   str(SHARED_DATA / "nifti" / "nibabel" / "functional.nii"), "--output", str(tmp_path / "p.csv"))
    assert proc.returncode == 1 and "functional.nii" in proc.stderr and "4D file" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [Path(r["path"]).name for r in rows] == ["CT_pitch.nii.gz", "vs_seg_001_t1_series"]
    assert rows[1]["series_instance_uid"] and not rows[0]["series_instance_uid"]
    for row in rows:
        assert float(row["prob_normal"]) + float(row["prob_hyperplasia"]) == pytest.approx(1, abs=1e-5)
    assert "a DICOM MR image; this model is for CT" in rows[1]["ood_reason"] and rows[1]["ood"] == "1"  # declared --modalities
    assert "DICOM" not in rows[0]["ood_reason"]  # a NIfTI file states no modality


def test_k_fold_cross_validation_keeps_patients_whole(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=18)
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for i, path in enumerate(sorted(root.rglob("*.png"))):
            writer.writerow([path.relative_to(tmp_path), path.parent.name, f"P{i // 3}"])
    run = tmp_path / "cv"
    proc = meddiag("train", str(tmp_path / "m.csv"), "--model", "seed_cnn", "--folds", "3", "--epochs", "3",
                   "--batch-size", "8", "--image-size", "24", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("3-fold CV: out-of-fold AUC")
    cv = json.loads((run / "cv_metrics.json").read_text())
    assert cv["folds"] == 3 and cv["grouped_by_patient"] and len(cv["per_fold_test"]["auc"]["values"]) == 3
    pooled_files = []
    patient_fold = {}
    for fold in (1, 2, 3):
        assert (run / f"fold-{fold}" / "metrics.json").exists()
        val = [r["path"] for r in csv.DictReader(open(run / f"fold-{fold}" / "splits" / "val.csv"))]
        pooled_files += val
        for path in val:
            patient = sorted(root.rglob("*.png")).index(Path(path)) // 3
            assert patient_fold.setdefault(patient, fold) == fold, "a patient is in two folds"
    assert len(pooled_files) == len(set(pooled_files)) == cv["n_images_pooled"] == cv["pooled_out_of_fold"]["n_images"]


def test_an_invalid_config_in_a_run_folder_is_one_error_line_for_every_command_that_reads_it(trained_run, tmp_path):
    import shutil

    _, run, _ = trained_run
    broken = tmp_path / "broken-run"
    shutil.copytree(run / "checkpoints", broken / "checkpoints")
    (broken / "config.yaml").write_text("data: x\nepochs: -3\nno_such_setting: 1\n")
    for args in (["evaluate", str(broken)], ["explain", str(broken), "--sanity"], ["train", "--out", str(broken), "--resume"]):
        proc = meddiag(*args)
        assert proc.returncode == 2 and no_traceback(proc), (args, proc.stderr)
        assert "invalid training configuration in" in proc.stderr and "epochs" in proc.stderr, (args, proc.stderr)


def test_explain_writes_into_the_run_folder_by_default_and_says_where(trained_run, tmp_path):
    data, run, _ = trained_run
    proc = meddiag("explain", str(run), str(data / "normal" / "img000.png"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (run / "explanations" / "img000_gradcam.png").exists() and not (tmp_path / "explanations").exists()
    assert str(run / "explanations") in proc.stdout


def test_a_run_finds_its_medmnist_file_again_without_meddiag_data(tmp_path, shared_medmnist):
    import shutil

    data_dir = tmp_path / "where-it-was"
    data_dir.mkdir()
    shutil.copy(shared_medmnist / "breastmnist.npz", data_dir / "breastmnist.npz")
    run = tmp_path / "run"
    proc = meddiag("train", "breastmnist", "--model", "seed_cnn", "--epochs", "1", "--out", str(run), "--no-progress",
                   env={"MEDDIAG_DATA": str(data_dir)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "data.json").read_text())["source"] == str((data_dir / "breastmnist.npz").resolve())
    again = meddiag("evaluate", str(run), env={"MEDDIAG_DATA": str(tmp_path / "empty")})  # offline, another data folder
    assert again.returncode == 0 and "test AUC" in again.stdout, again.stderr
    (data_dir / "breastmnist.npz").unlink()
    gone = meddiag("evaluate", str(run), env={"MEDDIAG_DATA": str(tmp_path / "empty"),
                                              "MEDDIAG_MEDMNIST_MIRROR": "http://127.0.0.1:9"})  # no download leaves the machine
    assert gone.returncode == 2 and "MEDDIAG_DATA" in gone.stderr and no_traceback(gone), gone.stderr
