"""Experiment loggers through Lightning: ``--logger csv,tensorboard,mlflow``.

Each logger gets the run's configuration (as hyper-parameters), every epoch's metrics as training logs them
(train and validation loss, validation AUC and accuracy, learning rate), and when the run has been evaluated
its test figures (AUC with its 95% interval, accuracy, balanced accuracy; the report's plots as images in
TensorBoard; ``report.html``, ``metrics.json`` and the plots as artifacts in MLflow).

- ``csv``: ``RUN/logs/csv/metrics.csv`` and ``hparams.yaml`` (``history.csv`` stays the run's own record);
- ``tensorboard``: ``RUN/logs/tensorboard/`` (``tensorboard --logdir runs``);
- ``mlflow``: the tracking server of ``MLFLOW_TRACKING_URI``, else a local store beside the run folders
  (``<runs>/mlflow.db``, artifacts in ``<runs>/mlartifacts``; ``mlflow ui --backend-store-uri
  sqlite:///runs/mlflow.db``); experiment ``MLFLOW_EXPERIMENT_NAME`` or ``meddiag``, the run named after
  its folder. A resumed run logs into the same MLflow run (its id is kept in ``RUN/logs/mlflow_run_id``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from meddiag.errors import ConfigError

LOGGERS = ("csv", "tensorboard", "mlflow")
_EXTRA = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


def make_loggers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list[Any]:
    """Lightning loggers for ``names`` writing about the run in ``run_dir``, its ``config`` logged."""
    loggers = [_logger(name, run_dir) for name in dict.fromkeys(names)]
    flat = _flatten(config)
    for logger in loggers:
        logger.log_hyperparams(flat)
    return loggers


def _logger(name: str, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger

    if name not in LOGGERS:
        raise ConfigError(f"unknown logger '{name}': choose {', '.join(LOGGERS)}")
    _require(name)
    logs = run_dir / "logs"
    if name == "csv":
        return CSVLogger(logs, name="csv", version="")
    if name == "tensorboard":
        return TensorBoardLogger(logs, name="tensorboard", version="", default_hp_metric=False)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else str(run_dir.resolve().parent / "mlartifacts")
    id_file = logs / "mlflow_run_id"
    known = id_file.read_text().strip() if id_file.is_file() else None
    logger = MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "meddiag"), run_name=run_dir.name,
                          tracking_uri=uri, artifact_location=artifacts, run_id=known)
    logs.mkdir(parents=True, exist_ok=True)
    id_file.write_text(logger.run_id)
    return logger


def _require(name: str) -> None:
    if name in _EXTRA:
        module, package = _EXTRA[name]
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"--logger {name} needs the {package} package: pip install 'meddiag[loggers]' "
                              f"(or pip install {package})") from None


def log_results(names: list[str], run_dir: Path, metrics: dict, step: int) -> None:
    """After evaluation: the test figures to every logger of ``names``, the report's files where a logger keeps files."""
    figures = {f"test_{k}": float(metrics[k]) for k in ("auc", "acc", "balanced_acc") if isinstance(metrics.get(k), (int, float))}
    if metrics.get("auc_ci"):
        figures["test_auc_ci_low"], figures["test_auc_ci_high"] = (float(v) for v in metrics["auc_ci"])
    plots = sorted((run_dir / "plots").glob("*.png"))
    for name in dict.fromkeys(names):
        if name == "csv":  # Lightning's CSV logger would start the file anew: add a row to it
            _append_row(run_dir / "logs" / "csv" / "metrics.csv", {"step": step, **figures})
            continue
        logger = _logger(name, run_dir)
        logger.log_metrics(figures, step=step)
        if name == "tensorboard":
            _images(logger, plots, step)
        elif name == "mlflow":
            for path in [run_dir / "report.html", run_dir / "metrics.json", *plots]:
                if path.is_file():
                    logger.experiment.log_artifact(logger.run_id, str(path), "plots" if path.suffix == ".png" else None)
        logger.finalize("success")


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """``row`` added to the CSV file ``path``, its header widened by the new columns."""
    import csv

    rows: list[dict[str, Any]] = []
    fields: list[str] = []
    if path.is_file():
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = list(reader.fieldnames or []), list(reader)
    fields += [k for k in row if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows([*rows, row])


def _images(logger: Any, plots: list[Path], step: int) -> None:
    import numpy as np
    from PIL import Image

    for path in plots:
        with Image.open(path) as img:
            logger.experiment.add_image(f"report/{path.stem}", np.asarray(img.convert("RGB")), step, dataformats="HWC")


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"augment": {"rotation": 10}}`` -> ``{"augment.rotation": 10}``; lists as text."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out
