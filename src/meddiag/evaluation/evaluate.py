"""Evaluating a trained run on a split: ``metrics.json``, per-image predictions, plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import meddiag
from meddiag.data.channels import match_channels
from meddiag.data.covariates import TabularSpec
from meddiag.data.dataset import ImageData, Split
from meddiag.data.sources import load_data
from meddiag.errors import DataError, MeddiagError
from meddiag.evaluation.fusion import fusion_analysis
from meddiag.evaluation.metrics import classification_metrics, json_safe
from meddiag.evaluation.ood import ood_summary
from meddiag.evaluation.plots import plot_confusion_matrix, plot_gallery, plot_roc, plot_training_curves
from meddiag.evaluation.report import DEFAULT_RESAMPLES, failure_cases, write_report
from meddiag.evaluation.table import PredictionTable
from meddiag.models.checkpoint import ModelCard, load_checkpoint
from meddiag.models.fusion import covariate_tensor
from meddiag.models.inference import predict_proba
from meddiag.models.uncertainty import predict_with_uncertainty
from meddiag.runfolder import FUSION, METRICS, OOD, PLOTS, PREDICTIONS, REPORT_HTML, RunFolder, model_checkpoint, write_text_atomic
from meddiag.training.config import TrainConfig
from meddiag.training.history import read_history
from meddiag.training.run import load_training_data


def evaluate_run(run_dir: str | Path, data: str | ImageData | None = None, split: str = "test",
                 out_dir: str | Path | None = None, progress: bool = True, subgroups: Sequence[str] | None = None,
                 n_resamples: int = DEFAULT_RESAMPLES, compare: Sequence[str | Path] = ()) -> dict:
    """Evaluate a run's best checkpoint: ``metrics.json``, ``predictions.csv``, plots, and the
    report (``report.json``, ``report.html``; see :mod:`meddiag.evaluation.report`).

    ``data`` None re-reads the run's own data exactly as training split it (an
    :class:`ImageData` passed in is taken to be that same data). Output goes to
    ``out_dir``; by default the run folder for its own test split, else
    ``RUN/eval-<split>`` or ``RUN/eval-<data>-<split>``. The run's validation predictions
    (``RUN/predictions_val.csv``, where operating points are chosen) are written when the data
    are the run's own. ``subgroups`` (manifest columns) default to the run's configured ones.
    ``compare``: other runs evaluated on the same images (e.g. an image-only model), added to the
    fusion section of a model with covariates with paired intervals of the difference.
    """
    run_dir = Path(run_dir)
    folder = RunFolder.of(run_dir)
    home = folder.root
    checkpoint = model_checkpoint(run_dir)
    model, card = load_checkpoint(checkpoint)
    config = _run_config(home)
    subgroups = list(subgroups) if subgroups is not None else (config.subgroups if config else [])
    own_data = data is None or isinstance(data, ImageData)
    if isinstance(data, ImageData):
        dataset = data
    elif own_data:
        if config is None:
            raise MeddiagError(f"{folder.config} not found: to evaluate a checkpoint outside its run folder, give --data")
        if config.positive_class is None and card.task == "binary":  # a run made before the positive class was explicit
            config = config.model_copy(update={"positive_class": card.class_names[1]})
        dataset = load_training_data(config, progress, home)
    else:
        dataset = load_data(data, image_size=card.image_size, fit=card.fit, window=card.window,
                            volume_index=card.volume_index, progress=progress,
                            positive_class=card.positive_class if card.task == "binary" else None,
                            covariates=_covariate_spec(card, config, data), cache=config.cache if config else "auto")
    if split not in dataset.splits:
        raise DataError(f"no split '{split}' in {dataset.name}; choose one of {', '.join(dataset.splits)}")
    if dataset.class_names != card.class_names:
        raise DataError(f"{dataset.name} has classes {dataset.class_names}, but the model was trained on {card.class_names}")
    if out_dir is None:
        tag = "" if own_data else "".join(c if c.isalnum() or c in "@_-" else "_" for c in Path(dataset.name).name)
        out_dir = folder.evaluation_dir(split, tag)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    part = dataset.splits[split]
    metrics, probs = evaluate_split(model, card, part)
    table = prediction_table(part, probs, subgroups)
    table.write(out_dir / PREDICTIONS, card.class_names, card.task, card.threshold)
    if own_data and "val" in dataset.splits and run_dir.is_dir():
        val = dataset.splits["val"]
        _, val_probs = evaluate_split(model, card, val)
        prediction_table(val, val_probs, subgroups).write(folder.val_predictions, card.class_names, card.task, card.threshold)
    plots = out_dir / PLOTS
    labels = part.labels.numpy()
    plot_roc(labels, probs, card.task, card.class_names, plots / "roc.png")
    if "confusion_matrix" in metrics:
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), card.class_names, plots / "confusion_matrix.png")
    history = read_history(folder.history)
    if history:
        plot_training_curves(history, folder.training_curves)
    failures = failure_cases(table, card.task, card.class_names, card.threshold)
    _plot_failures(part, failures, plots / "failures.png")
    ood_file = out_dir / OOD
    ood_file.unlink(missing_ok=True)
    if card.ood is not None:
        summary = ood_summary(model, card, checkpoint, part, probs)
        if summary is not None:
            write_text_atomic(ood_file, json.dumps(json_safe(summary), indent=2))
    fusion_file = out_dir / FUSION
    fusion_file.unlink(missing_ok=True)
    if card.covariates is not None and part.covariates is not None:
        train_split = dataset.splits.get("train") if own_data else None
        others = {name: probs_ for name, probs_ in (compared_predictions(r, part, split, card.class_names, card.task) for r in compare)}
        fusion = fusion_analysis(lambda c: split_probabilities(model, card, part, c), card, part, train_split,
                                 n_resamples=n_resamples, compare=others)
        write_text_atomic(fusion_file, json.dumps(json_safe(fusion), indent=2))
    report = write_report(out_dir, home, card, split=split, subgroups=subgroups, n_resamples=n_resamples, seed=0)
    metrics.update(split=split, data=dataset.name, checkpoint=str(checkpoint), report=str(out_dir / "report.html"),
                   model=card.model_name, meddiag_version=meddiag.__version__,
                   auc_ci=report["discrimination"]["auc_ci"], ci_method=f"bootstrap, {n_resamples} resamples of {report['discrimination']['resampled']}")
    write_text_atomic(out_dir / METRICS, json.dumps(json_safe(metrics), indent=2))
    return metrics


def rebuild_report(path: str | Path, subgroups: Sequence[str] | None = None, n_resamples: int = DEFAULT_RESAMPLES,
                   progress: bool = True) -> Path:
    """Write ``report.html``/``report.json`` of a run folder (or of an evaluation folder inside one)
    from its saved predictions; evaluates the run first when they are missing or lack a column
    of ``subgroups``. Returns the HTML file's path."""
    out_dir = Path(path)
    folder = RunFolder(out_dir) if RunFolder(out_dir).is_run() else RunFolder(out_dir.parent)
    home = folder.root
    if not folder.is_run():
        raise MeddiagError(f"{out_dir} is not a meddiag run folder (or an evaluation folder inside one)")
    config = _run_config(home)
    subgroups = list(subgroups) if subgroups is not None else (config.subgroups if config else [])
    predictions = out_dir / PREDICTIONS
    header = predictions.read_text().split("\n", 1)[0].split(",") if predictions.exists() else []
    ready = predictions.exists() and all(c in header for c in subgroups) and folder.val_predictions.exists()
    if ready:
        _, card = load_checkpoint(model_checkpoint(home))
        metrics_file = out_dir / METRICS
        split = json.loads(metrics_file.read_text()).get("split", "test") if metrics_file.exists() else "test"
        write_report(out_dir, home, card, split=split, subgroups=subgroups, n_resamples=n_resamples)
    elif out_dir == home:
        evaluate_run(home, subgroups=subgroups, n_resamples=n_resamples, progress=progress)
    else:
        raise MeddiagError(f"{out_dir} lacks the predictions this report needs; run 'meddiag evaluate' again with --out {out_dir}")
    return out_dir / REPORT_HTML


def compared_predictions(run: str | Path, part: Split, split: str, class_names: list[str], task: str) -> tuple[str, np.ndarray]:
    """(a name, (N, K) probabilities in ``part``'s order) from another run's saved evaluation of the same
    images; MeddiagError when it has none, or evaluated other images or classes."""
    folder = RunFolder.of(run)
    predictions = folder.evaluation_dir(split) / PREDICTIONS
    if not predictions.exists():
        raise MeddiagError(f"--compare {run}: {predictions} not found; evaluate that run on its {split} split first")
    _, card = load_checkpoint(model_checkpoint(folder.root))
    if card.class_names != class_names:
        raise MeddiagError(f"--compare {run}: its classes {card.class_names} are not this model's {class_names}")
    table = PredictionTable.read(predictions, class_names, task)
    where = {image: i for i, image in enumerate(table.images)}
    mine = part.paths or [str(i) for i in range(len(part))]
    lost = [p for p in mine if p not in where]
    if lost or len(where) != len(mine):
        raise MeddiagError(f"--compare {run}: its {split} split holds other images than this one's (e.g. "
                           f"{(lost or sorted(set(where) - set(mine)))[0]}); compare runs trained on the same data and seed")
    name = f"{folder.root.name} ({card.model_name}{', with covariates' if card.covariates else ', image only'})"
    return name, table.probs[[where[p] for p in mine]]


def _covariate_spec(card: ModelCard, config: TrainConfig | None, data: str) -> TabularSpec | None:
    """How other data's covariates are read for this model: its manifest columns, with the types it
    learnt, and its joined table (None: an image-only model, or data without a manifest: the model
    then sees every covariate missing)."""
    schema = card.covariates
    if schema is None or not data.lower().endswith(".csv"):
        return None
    kinds = schema.kinds()
    columns = [(name, kinds[name]) for name in schema.manifest_columns()]
    spec = config.tabular_spec() if config is not None else None
    return TabularSpec(columns=columns, tabular=spec.tabular if spec else None, join=schema.join or "patient_id",
                       tabular_columns=spec.tabular_columns if spec else [], missing=tuple(schema.missing_values))


def _run_config(home: Path) -> TrainConfig | None:
    config_file = RunFolder(home).config
    return TrainConfig.from_file(config_file) if config_file.exists() else None


def prediction_table(part: Split, probs: np.ndarray, subgroups: Sequence[str]) -> PredictionTable:
    """A split's predictions with its patient keys and the asked-for subgroup columns only (other
    manifest columns are never written: they might hold identifying data)."""
    images = part.paths if part.paths is not None else [str(i) for i in range(len(part))]
    meta = {k: part.meta[k] for k in subgroups if k in part.meta}
    return PredictionTable(list(images), part.labels.numpy(), probs, part.groups, meta)


def _plot_failures(part: Split, failures: dict, path: Path) -> None:
    cases = [(kind, row) for kind, rows in failures.items() for row in rows]
    if not cases:
        path.unlink(missing_ok=True)
        return
    images, captions = [], []
    for kind, row in cases:
        image = part.images[row["index"]].numpy()
        if image.ndim == 4:  # a volume (C, D, H, W): its middle slice
            image = image[:, image.shape[1] // 2]
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        images.append(image)
        label = {"false_positives": "FP", "false_negatives": "FN"}.get(kind, "error")
        captions.append(f"{label}: {row['label']} called {row['prediction']}\nP({row['prediction']}) {row['probability']:.3f}  #{row['index']}")
    plot_gallery(images, captions, path, "Most confident mistakes (test split)")


def evaluate_split(model: torch.nn.Module, card: ModelCard, part: Split) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on one in-memory split (with its covariates, for a model that takes them),
    and its probabilities (N, K)."""
    probs = split_probabilities(model, card, part, covariate_tensor(card.covariates, part.covariates))
    return classification_metrics(part.labels.numpy(), probs, card.task, card.class_names, card.threshold), probs


def split_probabilities(model: torch.nn.Module, card: ModelCard, part: Split, covariates: torch.Tensor | None) -> np.ndarray:
    """(N, K) probabilities of ``part``'s images with the (N, F) encoded ``covariates`` (None: none known),
    with the test-time augmentation / MC-dropout passes the card asks for."""
    images = match_channels(part.images, card.in_channels)
    if card.tta or card.mc_dropout:
        return predict_with_uncertainty(model, card, images, covariates=covariates)["mean"]
    return predict_proba(model, images, card.task, card.mean, card.std, temperature=card.temperature, covariates=covariates).numpy()


def summary_line(metrics: dict) -> str:
    return f"{metrics['split']} AUC {metrics['auc']:.4f}  ACC {metrics['acc']:.4f}  ({metrics['n_images']} images)"

