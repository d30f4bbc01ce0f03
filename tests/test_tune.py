"""Hyper-parameter search: a resumable Optuna study whose best configuration trains as given."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml

from conftest import make_image_folder


def meddiag(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDDIAG_DATA": "/nonexistent"}
    return subprocess.run([sys.executable, "-m", "meddiag", *args], capture_output=True, text=True, env=env, timeout=600)


def test_tune_searches_seed_cnn_widths_resumes_and_writes_a_config_train_takes(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=24)
    study = tmp_path / "study"
    args = ["tune", str(data), "--models", "seed_cnn", "--image-sizes", "24,32", "--epochs", "2", "--out", str(study)]
    first = meddiag(*args, "--trials", "3")
    assert first.returncode == 0, first.stderr
    assert "3 trials" in first.stdout and f"meddiag train --config {study / 'best.yaml'}" in first.stdout
    rows = list(csv.DictReader(open(study / "trials.csv")))
    assert len(rows) == 3 and {r["state"] for r in rows} <= {"complete", "pruned"}
    widths = {r["seed_cnn_width"] for r in rows}
    assert widths <= {"8", "16", "32", "64"} and all(r["lr"] for r in rows)
    assert not list(study.glob("trial-*/checkpoints/*.ckpt"))  # weights are not kept by default
    # the same command resumes the study: its trials are kept and new ones added
    second = meddiag(*args, "--trials", "1")
    assert second.returncode == 0, second.stderr
    rows2 = list(csv.DictReader(open(study / "trials.csv")))
    assert len(rows2) == 4 and [r["lr"] for r in rows2[:3]] == [r["lr"] for r in rows]
    # the best configuration is the best trial's, and train takes it
    best = yaml.safe_load((study / "best.yaml").read_text())
    top = max((r for r in rows2 if r["state"] == "complete"), key=lambda r: float(r["val_auc"]))
    assert best["model"] == "seed_cnn" and best["model_kwargs"]["widths"][0] == int(top["seed_cnn_width"])
    assert best["image_size"] == int(top["image_size"]) and best["lr"] == pytest.approx(float(top["lr"]), rel=1e-3)
    run = tmp_path / "run"
    trained = meddiag("train", "--config", str(study / "best.yaml"), "--epochs", "1", "--out", str(run), "--no-progress")
    assert trained.returncode == 0, trained.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["model_kwargs"] == best["model_kwargs"]


def test_the_same_seed_proposes_the_same_trials():
    import optuna

    from meddiag.training.config import TrainConfig
    from meddiag.training.tune import SearchSpace, suggest

    def proposals(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed), direction="maximize")
        out = []
        for i in range(5):
            trial = study.ask()
            config = suggest(trial, TrainConfig(data="x"), SearchSpace(models=["seed_cnn", "resnet18"], image_sizes=[28, 64]))
            out.append(config.model_dump(include={"model", "model_kwargs", "lr", "weight_decay", "image_size"}))
            study.tell(trial, float(i % 3))
        return out

    assert proposals(1) == proposals(1) and proposals(1) != proposals(2)


def test_pruning_stops_a_trial_that_the_pruner_rejects(tmp_path):
    import optuna

    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train
    from meddiag.training.tune import PruneOnValAUC

    class Reject:
        reported: list = []

        def report(self, value: float, step: int) -> None:
            self.reported.append((step, value))

        def should_prune(self) -> bool:
            return True

    data = make_image_folder(tmp_path / "images", per_class=12)
    trial = Reject()
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=5, image_size=24, batch_size=8, out=str(tmp_path / "run"))
    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        train(config, progress=False, callbacks=[PruneOnValAUC(trial)])
    assert len(trial.reported) == 1 and trial.reported[0][0] == 0
    # what was reported is this epoch's validation AUC (not the one before it)
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert trial.reported[0][1] == pytest.approx(float(history[0]["val_auc"]), abs=1e-5)


def test_unknown_model_options_are_refused_by_name(tmp_path):
    from meddiag.errors import ConfigError
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    config = TrainConfig(data=str(tmp_path), model="resnet18", model_kwargs={"widths": [8, 16, 32]})
    with pytest.raises(ConfigError, match="resnet18 has no option widths"):
        train(config, progress=False)
