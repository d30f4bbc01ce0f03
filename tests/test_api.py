"""The Python API: ``import meddiag`` is fast and changes nothing global; train, evaluate, load, predict and
explain from a notebook do what the command line does; the command line's options match the one config model."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import meddiag
from meddiag.errors import ConfigError, DataError

from conftest import make_image_folder


def test_import_is_fast_and_changes_no_global_setting():
    code = (
        "import time, sys\n"
        "t = time.perf_counter(); import meddiag; took = time.perf_counter() - t\n"
        "heavy = [m for m in ('torch', 'numpy', 'lightning', 'monai', 'matplotlib', 'PIL', 'pydicom') if m in sys.modules]\n"
        "import matplotlib, PIL.Image, PIL.ImageFile\n"
        "before = (matplotlib.get_backend(), PIL.Image.MAX_IMAGE_PIXELS, PIL.ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "import numpy as np\n"
        "from meddiag.data import images; from meddiag.evaluation import plots; from meddiag.explain import render\n"
        "render.overlay_figure(np.zeros((20, 30), np.uint8), np.random.rand(8, 8), 'x', __import__('io').BytesIO())\n"
        "after = (matplotlib.get_backend(), PIL.Image.MAX_IMAGE_PIXELS, PIL.ImageFile.LOAD_TRUNCATED_IMAGES)\n"
        "print(took, heavy, before == after, before, after)\n"
    )
    env = {"MPLBACKEND": "pdf", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    took, heavy, same, *_ = done.stdout.split(" ", 3)
    assert float(took) < 1.0, done.stdout
    assert heavy == "[]", done.stdout  # nothing heavy until a name is used
    assert same == "True", done.stdout  # the backend the user chose, Pillow's limits: untouched


def test_unknown_options_are_refused_by_name_and_the_config_is_the_commands():
    with pytest.raises(ConfigError, match="epochz"):
        meddiag.training_config("pneumoniamnist", epochz=3)
    cfg = meddiag.training_config("pneumoniamnist", model="seed_cnn", image_size=64, init_weights="runs/x")
    assert (cfg.model, cfg.image_size, cfg.init_weights, cfg.epochs) == ("seed_cnn", 64, "runs/x", 20)
    with pytest.raises(ConfigError, match="DATA"):
        meddiag.train()


def test_train_evaluate_and_read_a_run_from_python(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=24)
    run = meddiag.train(data, model="seed_cnn", epochs=2, image_size=32, batch_size=8, out=tmp_path / "run", ood_keep=None)
    assert isinstance(run, meddiag.Run) and run.path == tmp_path / "run"
    assert 0 <= run.metrics["auc"] <= 1 and run.metrics["split"] == "test" and "test AUC" in run.summary
    assert [row["epoch"] for row in run.history] == [1, 2]
    assert run.config.model == "seed_cnn" and run.card.class_names == ["normal", "pneumonia"]
    assert run.report.html.is_file() and run.report.data["discrimination"]["auc"] == pytest.approx(run.metrics["auc"])
    report = meddiag.evaluate(run, split="val")
    assert report.metrics["split"] == "val" and report.html == tmp_path / "run" / "eval-val" / "report.html"
    assert report.html.is_file()
    assert repr(run).startswith("Run(") and "test AUC" in repr(run)


def test_a_loaded_model_predicts_files_arrays_tensors_and_pil_images_alike(small_run, tmp_path):
    import torch

    model = meddiag.load(small_run)
    files = sorted((small_run.parent / "images").rglob("*.png"))[:3]
    by_file = model.predict([*files, tmp_path / "absent.png"])
    assert [p.path for p in by_file] == [str(f) for f in files]
    assert len(by_file.failures) == 1 and "absent.png" in by_file.failures[0].path
    pixels = [np.asarray(Image.open(f)) for f in files]
    probs = np.array([[p.probabilities[c] for c in model.class_names] for p in by_file])
    for given in (pixels, np.stack(pixels), torch.from_numpy(np.stack(pixels)), [Image.open(f) for f in files],
                  [p.astype(np.float32) / 255 for p in pixels], [np.stack([p] * 3, axis=-1) for p in pixels]):
        got = model.predict(given)
        assert [p.path for p in got] == ["array[0]", "array[1]", "array[2]"]
        assert np.allclose([[p.probabilities[c] for c in model.class_names] for p in got], probs, atol=1e-5)
    one = model.predict(pixels[0])
    assert len(one) == 1 and one[0].predicted == by_file[0].predicted
    rows = by_file.rows()
    assert rows[0]["prediction"] == by_file[0].predicted and set(rows[0]) >= {"path", "prob_normal", "uncertainty", "ood"}
    assert by_file.to_csv(tmp_path / "p.csv").read_text().startswith("path,prediction,prob_normal")
    # 16-bit values are scaled by their own range, as 16-bit PNG files are
    wide = model.predict(pixels[0].astype(np.uint16) * 200)
    assert wide[0].probabilities == pytest.approx(one[0].probabilities, abs=0.02)


def test_a_loaded_model_refuses_what_is_not_an_image_and_names_it(small_run):
    model = meddiag.load(small_run)
    with pytest.raises(DataError, match=r"shape \(2, 3, 4, 5, 6\)"):
        model.predict(np.zeros((2, 3, 4, 5, 6), np.uint8))
    bad = np.zeros((8, 8), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(DataError, match=r"array\[0\].*NaN"):
        model.predict(bad)
    with pytest.raises(DataError, match="dict"):
        model.predict({"not": "an image"})
    with pytest.raises(DataError, match="no covariates"):
        model.predict(np.zeros((8, 8), np.uint8), covariates={"age": 3})


def test_explain_from_python_gives_maps_over_the_image(small_run, tmp_path):
    model = meddiag.load(small_run)
    path = sorted((small_run.parent / "images").rglob("*.png"))[0]
    image = Image.open(path).resize((60, 40))  # another size and aspect than the model's input
    [heat] = model.explain(image)
    assert heat.map.shape == (40, 60) and 0 <= heat.map.min() and heat.map.max() <= 1
    assert heat.predicted in model.class_names and heat.explained == heat.predicted
    [other] = model.explain(path, class_name="normal")
    assert other.explained == "normal" and other.source == str(path)
    assert heat.save(tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(DataError, match="classes are"):
        model.explain(image, class_name="fracture")


# -- the command line against the one configuration model -----------------------------------------------

# settings of a config file alone, on purpose: architecture and optimiser details, normalisation, plumbing
CONFIG_ONLY = {
    "train": {"model_kwargs", "augment", "optimizer", "scheduler", "weight_decay", "val_fraction", "test_fraction", "precision",
              "num_workers", "keep_resume_state", "focal_gamma", "mean", "std", "threshold"},
    "pretrain": {"model_kwargs", "augment", "weight_decay", "projection_dim", "noise", "mean", "std", "precision"},
}


def _cli_options(command) -> dict[str, str]:  # noqa: ANN001 - a typer command function
    """Each option of ``command``: its help text."""
    import typing

    hints = typing.get_type_hints(command, include_extras=True)
    out = {}
    for name in inspect.signature(command).parameters:
        for meta in getattr(hints.get(name), "__metadata__", ()):
            if hasattr(meta, "help"):
                out[name] = meta.help or ""
    return out


@pytest.mark.parametrize("command, config_class", [("train", "TrainConfig"), ("pretrain", "PretrainConfig")])
def test_every_setting_is_a_command_line_option_with_the_configs_default(command, config_class):
    """The command line repeats each setting of the config model by hand (typer needs its parameters); this
    checks them against the model: every setting has an option (or is a config-file setting on purpose),
    every option is a setting, and a plain ``[default: X]`` in the help is the model's default."""
    from meddiag import cli
    from meddiag.training import config as train_config
    from meddiag.training import pretrain as pretrain_module

    model = getattr(train_config, config_class, None) or getattr(pretrain_module, config_class)
    options = _cli_options(getattr(cli, command))
    fields = model.model_fields
    not_settings = {"config", "resume", "progress", "hflip"}
    assert set(options) - set(fields) - not_settings == set(), "options that are no setting"
    assert CONFIG_ONLY[command] <= set(fields), "config-only names that are no setting"
    missing = set(fields) - set(options) - CONFIG_ONLY[command]
    assert missing == set(), f"settings without a {command} option: {sorted(missing)}"
    for name, text in options.items():
        match = re.search(r"\[default: ([^\]]+)\]", text)
        if name not in fields or not match or not re.fullmatch(r"[\w.]+", match.group(1)):
            continue  # descriptive defaults ("128; 32 for volumes") are read, not compared
        shown, default = match.group(1), fields[name].get_default(call_default_factory=True)
        if isinstance(default, bool):
            assert shown == ("yes" if default else "no"), f"--{name.replace('_', '-')}: help says {shown}, the default is {default}"
            continue
        if shown == "none" and default in (None, "none", []):
            continue
        assert str(default).lower() == shown.lower() or (isinstance(default, float) and float(shown) == default), \
            f"--{name.replace('_', '-')}: help says {shown}, the config's default is {default!r}"


def test_experiment_loggers_get_the_config_every_epoch_and_the_test_figures(tmp_path, monkeypatch):
    """--logger csv,tensorboard,mlflow: a local MLflow store, TensorBoard event files and Lightning's CSV."""
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_image_folder(tmp_path / "images", per_class=20)
    run = meddiag.train(data, model="seed_cnn", epochs=2, image_size=32, batch_size=8, out=tmp_path / "runs" / "a",
                        loggers=["csv", "tensorboard", "mlflow"])
    logs = run.path / "logs"
    rows = (logs / "csv" / "metrics.csv").read_text().splitlines()
    assert "val_auc" in rows[0] and "test_auc" in rows[0] and "model: seed_cnn" in (logs / "csv" / "hparams.yaml").read_text()
    events = EventAccumulator(str(logs / "tensorboard")).Reload()
    assert {"val_auc", "train_loss", "test_auc"} <= set(events.Tags()["scalars"]) and "report/roc" in events.Tags()["images"]
    assert len(events.Scalars("val_auc")) == 2  # one point per epoch
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    logged = client.get_run((logs / "mlflow_run_id").read_text().strip())
    assert logged.info.run_name == "a" and logged.data.params["model"] == "seed_cnn" and logged.data.params["epochs"] == "2"
    assert logged.data.metrics["test_auc"] == pytest.approx(run.metrics["auc"])
    assert len(client.get_metric_history(logged.info.run_id, "val_auc")) == 2
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"report.html", "metrics.json", "plots"} <= artifacts
    with pytest.raises(ConfigError, match="logger"):
        meddiag.training_config(data, loggers=["wandb"])
