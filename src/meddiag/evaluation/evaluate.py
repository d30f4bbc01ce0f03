"""Evaluating a trained run on a split: ``metrics.json``, per-image predictions, plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

import meddiag
from meddiag.data.channels import match_channels
from meddiag.data.dataset import ImageData, Split
from meddiag.data.sources import load_data
from meddiag.errors import DataError, MeddiagError
from meddiag.evaluation.metrics import classification_metrics, json_safe, predict_labels
from meddiag.evaluation.plots import plot_confusion_matrix, plot_roc, plot_training_curves
from meddiag.models.checkpoint import ModelCard, load_checkpoint
from meddiag.models.inference import predict_proba
from meddiag.training.config import TrainConfig, read_yaml
from meddiag.training.history import read_history
from meddiag.training.run import load_training_data


def best_checkpoint(run_dir: Path) -> Path:
    """A run folder's ``checkpoints/best.ckpt`` (or the path itself, if it is a checkpoint file)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    path = run_dir / "checkpoints" / "best.ckpt"
    if not run_dir.exists():
        raise MeddiagError(f"run folder {run_dir} does not exist")
    if not path.exists():
        raise MeddiagError(f"{run_dir} has no checkpoints/best.ckpt: is it a meddiag run folder, and did training finish an epoch?")
    return path


def run_folder(path: Path) -> Path:
    """The run folder of a run folder or of a checkpoint file inside one (``RUN/checkpoints/x.ckpt``)."""
    return path.parent.parent if path.is_file() else path


def evaluate_run(run_dir: str | Path, data: str | ImageData | None = None, split: str = "test",
                 out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluate a run's best checkpoint and write ``metrics.json``, ``predictions.csv`` and plots.

    ``data`` None re-reads the run's own data exactly as training split it (an
    :class:`ImageData` passed in is taken to be that same data). Output goes to
    ``out_dir``; by default the run folder for its own test split, else
    ``RUN/eval-<split>`` or ``RUN/eval-<data>-<split>``.
    """
    run_dir = Path(run_dir)
    model, card = load_checkpoint(best_checkpoint(run_dir))
    own_data = data is None or isinstance(data, ImageData)
    if isinstance(data, ImageData):
        dataset = data
    elif own_data:
        config_file = run_folder(run_dir) / "config.yaml"
        if not config_file.exists():
            raise MeddiagError(f"{config_file} not found: to evaluate a checkpoint outside its run folder, give --data")
        dataset = load_training_data(TrainConfig.model_validate(read_yaml(config_file)), progress)
    else:
        dataset = load_data(data, image_size=card.image_size, fit=card.fit, window=card.window,
                            volume_index=card.volume_index, progress=progress)
    if split not in dataset.splits:
        raise DataError(f"no split '{split}' in {dataset.name}; choose one of {', '.join(dataset.splits)}")
    if dataset.class_names != card.class_names:
        raise DataError(f"{dataset.name} has classes {dataset.class_names}, but the model was trained on {card.class_names}")
    if out_dir is None:
        home = run_folder(run_dir)
        if own_data and split == "test":
            out_dir = home
        else:
            tag = "" if own_data else "-" + "".join(c if c.isalnum() or c in "@_-" else "_" for c in Path(dataset.name).name)
            out_dir = home / f"eval{tag}-{split}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    part = dataset.splits[split]
    metrics, probs = evaluate_split(model, card, part)
    labels = part.labels.numpy()
    metrics.update(split=split, data=dataset.name, checkpoint=str(best_checkpoint(run_dir)),
                   model=card.model_name, meddiag_version=meddiag.__version__)
    (out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    write_predictions(out_dir / "predictions.csv", card, probs, labels, part.paths)
    plots = out_dir / "plots"
    plot_roc(labels, probs, card.task, card.class_names, plots / "roc.png")
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), card.class_names, plots / "confusion_matrix.png")
    history = read_history(run_folder(run_dir) / "history.csv")
    if history:
        plot_training_curves(history, run_folder(run_dir) / "plots" / "training_curves.png")
    return metrics


def evaluate_split(model: torch.nn.Module, card: ModelCard, part: Split) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on one in-memory split, and its probabilities (N, K)."""
    images = match_channels(part.images, card.in_channels)
    probs = predict_proba(model, images, card.task, card.mean, card.std).numpy()
    return classification_metrics(part.labels.numpy(), probs, card.task, card.class_names, card.threshold), probs


def write_predictions(path: Path, card: ModelCard, probs: np.ndarray, labels: np.ndarray, paths: list[str] | None) -> None:
    """One row per image: its source (or index), true and predicted class, each class's probability."""
    pred = predict_labels(probs, card.task, card.threshold)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "prediction", *[f"prob_{c}" for c in card.class_names]])
        for i in range(len(probs)):
            source = paths[i] if paths else str(i)
            if card.task == "multilabel":
                truth = ";".join(c for c, v in zip(card.class_names, labels[i]) if v)
                decided = ";".join(c for c, v in zip(card.class_names, pred[i]) if v)
            else:
                truth, decided = card.class_names[int(labels[i])], card.class_names[int(pred[i])]
            writer.writerow([source, truth, decided, *[f"{p:.6f}" for p in probs[i]]])


def summary_line(metrics: dict) -> str:
    return f"{metrics['split']} AUC {metrics['auc']:.4f}  ACC {metrics['acc']:.4f}  ({metrics['n_images']} images)"

