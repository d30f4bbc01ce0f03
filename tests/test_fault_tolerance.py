"""A run killed at any moment resumes to the result of an uninterrupted one, and leaves no file
that cannot be read; a run folder that cannot be written is refused before any work."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder

def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_command(data: str, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meddiag", "train", data, "--model", "seed_cnn", "--epochs", "4", "--out", str(run),
            "--no-progress", *extra]


def history_epochs(run: Path) -> list[int]:
    path = run / "history.csv"
    if not path.exists():
        return []
    with open(path) as fh:
        return [int(r["epoch"]) for r in csv.DictReader(fh)]


def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, shared_medmnist):
    data = "pneumoniamnist"
    ENV = one_thread_env()
    whole = tmp_path / "whole"
    done = subprocess.run(train_command(data, whole), capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "training seed_cnn on" in done.stderr  # the start line comes before the first epoch

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_command(data, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while len(history_epochs(killed)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # into epoch 3 (an epoch takes a few seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    epochs = history_epochs(killed)
    assert 2 <= len(epochs) < 4, epochs
    # whatever the moment of the kill, every checkpoint on disk loads
    from meddiag.models.checkpoint import load_checkpoint

    torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)
    load_checkpoint(killed / "checkpoints" / "best.ckpt")
    assert not (killed / "training.json").exists()

    resumed = subprocess.run(train_command(data, killed, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming seed_cnn at epoch" in resumed.stderr
    assert history_epochs(killed) == [1, 2, 3, 4]
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (whole, killed))
    assert abs(a["auc"] - b["auc"]) <= 0.005 and abs(a["acc"] - b["acc"]) <= 0.01, (a["auc"], b["auc"], a["acc"], b["acc"])
    # training is deterministic here (CPU, fp32, one thread): the resumed run is the same run
    with open(whole / "predictions.csv") as fa, open(killed / "predictions.csv") as fb:
        pa, pb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert [r["image"] for r in pa] == [r["image"] for r in pb]
    worst = max(abs(float(x["prob_pneumonia"]) - float(y["prob_pneumonia"])) for x, y in zip(pa, pb))
    assert worst < 1e-4, worst
    # a finished run keeps only what predicting needs
    assert (killed / "training.json").exists() and not (killed / "checkpoints" / "last.ckpt").exists()
    state = torch.load(killed / "checkpoints" / "best.ckpt", weights_only=True)
    assert set(state) == {"state_dict", "meddiag"} and all(k.startswith(("model.", "ood.")) for k in state["state_dict"])
    assert any(k.startswith("ood.") for k in state["state_dict"])  # the OOD reference is part of predicting
    # resuming a finished run evaluates it again (as after a kill during evaluation); more epochs are refused
    again = subprocess.run(train_command(data, killed, "--resume"), capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0 and "test AUC" in again.stdout, again.stderr
    more = subprocess.run(train_command(data, killed, "--resume", "--epochs", "6"), capture_output=True, text=True, env=ENV, timeout=600)
    assert more.returncode == 2 and "finished its 4 epochs" in more.stderr and "Traceback" not in more.stderr


def test_an_unwritable_run_folder_is_refused_before_any_data_is_read(tmp_path):
    from meddiag.errors import ConfigError
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = TrainConfig(data=str(tmp_path / "no-data-needed"), model="seed_cnn", out=str(blocker / "run"))
    with pytest.raises(ConfigError, match="cannot write the run folder"):
        train(config, progress=False)


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    from meddiag.errors import ConfigError
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = make_image_folder(tmp_path / "images", per_class=10)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    config = TrainConfig(data=str(data), model="seed_cnn", image_size=24, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="MB free on the disk of"):
        train(config, progress=False)
    assert not (tmp_path / "run" / "history.csv").exists()


def test_a_killed_tune_study_resumes_and_retries_the_killed_trial(tmp_path):
    from meddiag.training.tune import GRACE_S

    data = make_image_folder(tmp_path / "images", per_class=40)
    out = tmp_path / "study"
    command = [sys.executable, "-m", "meddiag", "tune", str(data), "--models", "seed_cnn", "--image-sizes", "24",
               "--epochs", "4", "--out", str(out)]
    proc = subprocess.Popen([*command, "--trials", "3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread_env())
    deadline = time.time() + 300
    while not history_epochs(out / "trial-000") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(GRACE_S + 2)  # the killed trial's heartbeat goes stale
    resumed = subprocess.run([*command, "--trials", "1"], capture_output=True, text=True, env=one_thread_env(), timeout=600)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["state"] for r in rows] == ["fail", "complete"], rows
    params = [{k: v for k, v in r.items() if k not in ("trial", "state", "val_auc", "epochs", "minutes")} for r in rows]
    assert params[0] == params[1]  # the killed configuration was tried again
    assert (out / "best.yaml").exists()


def test_run_files_are_written_whole_with_the_usual_permissions(tmp_path):
    from meddiag.runfolder import write_text_atomic

    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "sub" / "report.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary file left behind
