"""meddiag from Python: the command line's jobs as functions and objects, for notebooks and scripts.

    import meddiag
    run = meddiag.train("pneumoniamnist", model="resnet18", epochs=5)
    run.metrics["auc"], run.path
    model = meddiag.load(run)                       # a Run, a run folder or a checkpoint file
    model.predict(["a.png", "b.dcm"])                # files and folders; numpy arrays, tensors, PIL images
    model.explain(pil_image)                         # where the model looked
    report = meddiag.evaluate(run); report.metrics["auc"]

Every option of ``meddiag train`` is a keyword of :func:`train`, named as in ``config.yaml`` (the command
line's ``--image-size`` is ``image_size``); one unknown is refused by name. The command line calls these
functions: what it does, they do.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy modules load on first use, not on ``import meddiag``
    import numpy as np

    from meddiag.data.collect import Failure
    from meddiag.models.checkpoint import ModelCard
    from meddiag.serving.predictor import Prediction
    from meddiag.training.config import TrainConfig
    from meddiag.training.pretrain import PretrainConfig


def training_config(data: str | Path | None = None, *, config: str | Path | None = None, resume: bool = False,
                    **options: Any) -> TrainConfig:
    """The configuration ``train`` would run: the defaults, then ``config`` (YAML), then ``options``.
    Resuming a folder (``out=...``) without ``config`` takes that run's own ``config.yaml``."""
    from meddiag.training.config import TrainConfig

    return _configuration(TrainConfig, "train", data, config, resume, options)


def _configuration(kind: Any, verb: str, data: str | Path | None, config: str | Path | None, resume: bool,
                   options: dict[str, Any]) -> Any:
    """``kind`` (a config model) from its defaults, ``config`` and ``options`` (paths as text); resuming a
    folder without ``config``, from that folder's own ``config.yaml``."""
    from meddiag.errors import ConfigError
    from meddiag.runfolder import RunFolder

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    out = options.get("out")
    if resume and out and config is None and RunFolder(out).config.exists():
        config = RunFolder(out).config
    if data is None and config is None:
        raise ConfigError(f"give the DATA to {verb} on (or a config file that names it)")
    return kind.from_sources(config, data=str(data) if data is not None else None, **options)


def train(data: str | Path | None = None, *, config: str | Path | None = None, resume: bool = False,
          progress: bool | None = None, **options: Any) -> Run:
    """Train a model on ``data`` and evaluate it on the test split, as ``meddiag train`` does; returns the
    :class:`Run`. ``options``: any setting of the training configuration (``model``, ``epochs``,
    ``image_size``, ``init_weights``, ...). ``folds=K`` cross-validates instead (the run's ``cv_metrics``)."""
    from meddiag.errors import ConfigError
    from meddiag.workflow import cross_validate, train_and_evaluate

    cfg = training_config(data, config=config, resume=resume, **options)
    if cfg.folds > 1:
        if resume:
            raise ConfigError("resume continues one run; it does not apply to folds")
        result = cross_validate(cfg, progress=progress)
        return Run(result.run_dir, summary=result.summary())
    done = train_and_evaluate(cfg, resume=resume, progress=progress)
    return Run(done.train.run_dir, summary=done.summary() if done.test_metrics is not None else "")


def pretrain(data: str | Path | None = None, *, config: str | Path | None = None, resume: bool = False,
             progress: bool | None = None, hflip: bool | None = None, **options: Any) -> Path:
    """Self-supervised pretraining on ``data``'s images without labels, as ``meddiag pretrain`` does; returns
    the folder that ``train(..., init_weights=folder)`` starts from. ``options``: ``model``, ``epochs``,
    ``image_size``, ``temperature``, ... as in its ``config.yaml``; ``hflip``: also flip the views left-right."""
    from meddiag.training.pretrain import PretrainConfig, pretrain as run_pretrain

    cfg: PretrainConfig = _configuration(PretrainConfig, "pretrain", data, config, resume, options)
    if hflip is not None:
        cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"hflip": hflip})})
    return run_pretrain(cfg, resume=resume, progress=progress)


def evaluate(run: Run | str | Path, *, data: str | None = None, split: str = "test", out: str | Path | None = None,
             subgroups: Sequence[str] | None = None, resamples: int = 1000, compare: Sequence[str | Path] = (),
             progress: bool = False) -> Report:
    """Evaluate a trained run on its own ``split`` or on other ``data``, as ``meddiag evaluate`` does: metrics,
    predictions, plots and the report, written to the run folder (or ``out``); returns the :class:`Report`."""
    from meddiag.evaluation.evaluate import evaluate_run

    metrics = evaluate_run(_path(run), data=data, split=split, out_dir=out, progress=progress, subgroups=subgroups,
                           n_resamples=resamples, compare=[_path(c) for c in compare])
    return Report(Path(metrics["report"]).parent)


def load(run: Run | str | Path, *, device: str = "cpu", backend: str = "torch", batch_size: int = 64) -> Model:
    """A trained model, ready to diagnose: a :class:`Run`, a run folder or a checkpoint file. ``backend="onnx"``
    runs it in ONNX Runtime (the ``serve`` extra)."""
    from meddiag.serving.predictor import Predictor

    path = _path(run)
    predictor = Predictor.from_run(path, device=device, backend=backend, batch_size=batch_size) if path.is_dir() else \
        Predictor(path, device=device, backend=backend, batch_size=batch_size)
    return Model(predictor)


def _path(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


class Run:
    """A run folder: its configuration, test metrics, training history and report."""

    def __init__(self, path: str | Path, summary: str = "") -> None:
        from meddiag.errors import MeddiagError
        from meddiag.runfolder import RunFolder

        self.path = Path(path)
        self._folder = RunFolder(self.path)
        if not (self._folder.is_run() or (self.path / "cv_metrics.json").is_file()):
            raise MeddiagError(f"{self.path} is not a meddiag run folder (no checkpoints, and no cv_metrics.json of a cross-validation)")
        self.summary = summary

    @property
    def config(self) -> TrainConfig:
        from meddiag.training.config import TrainConfig

        return TrainConfig.from_file(self._folder.config)

    @property
    def metrics(self) -> dict | None:
        """Test metrics (``metrics.json``; cross-validation: ``cv_metrics.json``); None before evaluation."""
        for name in ("metrics.json", "cv_metrics.json"):
            if (self.path / name).is_file():
                return json.loads((self.path / name).read_text())
        return None

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per epoch: train loss, validation loss, AUC, accuracy, learning rate, seconds."""
        if not self._folder.history.is_file():
            return []
        with open(self._folder.history, newline="") as fh:
            return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(fh)]

    @property
    def report(self) -> Report:
        return Report(self.path)

    @property
    def card(self) -> ModelCard:
        from meddiag.models.checkpoint import load_checkpoint
        from meddiag.runfolder import model_checkpoint

        return load_checkpoint(model_checkpoint(self.path))[1]

    def load(self, **kwargs: Any) -> Model:
        return load(self, **kwargs)

    def __repr__(self) -> str:
        m = self.metrics or {}
        score = f", test AUC {m['auc']:.4f}" if isinstance(m.get("auc"), float) else ""
        return f"Run('{self.path}'{score})"


class Report:
    """An evaluation: ``metrics`` (``metrics.json``), ``data`` (``report.json``: CIs, operating points,
    calibration, subgroups ...), and ``html``, the self-contained page."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def data(self) -> dict:
        return json.loads((self.path / "report.json").read_text())

    @property
    def html(self) -> Path:
        return self.path / "report.html"

    def __repr__(self) -> str:
        return f"Report('{self.html}')"


@dataclass
class Heatmap:
    """Where the model looked for ``explained`` in one input: ``map`` (H, W) in [0, 1] over ``image`` as
    read (a 2D input), or (D, H, W) over the model's input volume (a 3D one)."""

    source: str
    explained: str
    predicted: str
    probability: float  # of the explained class
    map: np.ndarray
    image: np.ndarray
    method: str
    caption: str

    def save(self, path: str | Path) -> Path:
        """A PNG figure of the heatmap over the image, with its caption."""
        from meddiag.explain.render import overlay_figure, volume_figure

        if self.map.ndim == 3:
            return volume_figure(self.image, self.map, self.caption, Path(path))  # type: ignore[return-value]
        return overlay_figure(self.image, self.map, self.caption, Path(path), fit="stretch")


class Predictions(list):
    """A list of :class:`~meddiag.serving.predictor.Prediction`, one per input diagnosed, and ``failures``: each
    input that could not be (path and reason); ``rows()`` for a table (e.g. ``pandas.DataFrame(p.rows())``)."""

    def __init__(self, items: list[Prediction], failures: list[Failure], class_names: list[str]) -> None:
        super().__init__(items)
        self.failures = failures
        self.class_names = class_names

    def rows(self) -> list[dict[str, Any]]:
        return [{"path": p.path, "prediction": p.predicted, **{f"prob_{c}": p.probabilities[c] for c in self.class_names},
                 "uncertainty": p.uncertainty, "abstain": p.abstain, "ood": p.ood, "ood_reason": p.ood_reason}
                for p in self]

    def to_csv(self, path: str | Path) -> Path:
        """The same CSV as ``meddiag predict --output``."""
        from meddiag.serving.predictor import write_predictions_csv

        write_predictions_csv(path, list(self), self.class_names)
        return Path(path)


class Model:
    """A trained model (:func:`load`): ``predict`` and ``explain`` take files and folders, or images in memory."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    @property
    def card(self) -> ModelCard:
        """Everything the checkpoint says of the model: classes, input size, normalisation, threshold, OOD rule ..."""
        return self.predictor.card

    @property
    def class_names(self) -> list[str]:
        return list(self.card.class_names)

    def predict(self, inputs: Any, covariates: dict | Sequence[dict] | None = None) -> Predictions:
        """Diagnose ``inputs``: a file or folder path, a list of them, or images in memory (a numpy array or
        torch tensor — one image or a batch —, a PIL image, or a list of these; see
        :func:`meddiag.models.inputs.array_inputs`). ``covariates``: for a model with patient data, a dict
        (every input) or one dict per input; missing values allowed. A file that cannot be read is in
        ``failures``, the others are predicted."""
        from meddiag.data.covariates import PatientData

        if _are_paths(inputs):
            paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
            patients = self._patients(covariates, len(paths))
            if patients is not None and len(patients) > 1:
                items = [self.predictor.predict([p], patients[i]) for i, p in enumerate(paths)]
                return Predictions([x for r, _ in items for x in r], [f for _, fs in items for f in fs], self.class_names)
            found, failures = self.predictor.predict(paths, patients[0] if patients else None)
            return Predictions(found, failures, self.class_names)
        items = self._array_items(inputs)
        patients = self._patients(covariates, len(items))
        if patients is not None:
            for i, item in enumerate(items):
                item.covariates = self.predictor.case_covariates(patients[min(i, len(patients) - 1)], item.source)
        elif self.card.covariates is not None:
            for item in items:
                item.covariates = self.predictor.case_covariates(PatientData.single({}), item.source)
        found = []
        for start in range(0, len(items), self.predictor.batch_size):
            found += self.predictor.predict_inputs(items[start:start + self.predictor.batch_size])
        return Predictions(found, [], self.class_names)

    def explain(self, inputs: Any, method: str = "gradcam", class_name: str | None = None) -> list[Heatmap]:
        """Heatmaps of where the model looked (``gradcam``, ``hirescam``, ``gradcampp`` or ``occlusion``), for the
        predicted class or ``class_name``; inputs as :meth:`predict` takes them."""
        import torch

        from meddiag.errors import DataError
        from meddiag.explain.files import caption
        from meddiag.explain.render import map_to_original
        from meddiag.explain.saliency import explained_classes, probabilities, saliency_maps

        card = self.card
        if class_name is not None and class_name not in card.class_names:
            raise DataError(f"class {class_name}: the model's classes are {', '.join(card.class_names)}")
        items = self._read_paths(inputs) if _are_paths(inputs) else self._array_items(inputs)
        out = []
        for item in items:
            x = torch.tensor(item.array[None])
            cov = None
            if card.covariates is not None:
                cov = torch.from_numpy(card.covariates.missing_row()[None])
            probs = probabilities(self.predictor.model, x, card, cov)[0]
            target = card.class_names.index(class_name) if class_name else explained_classes(probs[None], card)[0]
            heat = saliency_maps(self.predictor.model, card, x, method, [target], covariates=cov)[0]
            text, predicted = caption(card, probs, target, method)
            if item.original is not None:
                image = item.original
                heat = map_to_original(heat, image.shape[0], image.shape[1], card.fit)
            else:
                image = item.array[0]
            out.append(Heatmap(item.source, card.class_names[target], predicted, float(probs[target]), heat, image, method, text))
        return out

    def _read_paths(self, inputs: Any) -> list[Any]:
        from meddiag.data.collect import collect_sources
        from meddiag.errors import DataError

        paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
        sources, failures = collect_sources(paths, self.card.spatial_dims)
        if failures:
            raise DataError(f"{failures[0].path}: {failures[0].reason}")
        return [item for source in sources for item in self.predictor.read(source)]

    def _array_items(self, inputs: Any) -> list[Any]:
        from meddiag.models.inputs import array_inputs

        items = array_inputs(inputs, self.card)
        for item in items:
            item.check(self.card)
        return items

    def _patients(self, covariates: dict | Sequence[dict] | None, n: int) -> list[Any] | None:
        from meddiag.data.covariates import PatientData
        from meddiag.errors import DataError

        if covariates is None:
            return None
        if self.card.covariates is None:
            raise DataError("this model takes no covariates (it was trained on images alone)")
        if isinstance(covariates, dict):
            return [PatientData.single(covariates, "the covariates given")]
        rows = list(covariates)
        if len(rows) != n:
            raise DataError(f"covariates: {len(rows)} dicts for {n} inputs; give one dict for all, or one per input")
        return [PatientData.single(r, f"covariates[{i}]") for i, r in enumerate(rows)]

    def __repr__(self) -> str:
        c = self.card
        return f"Model({c.model_name}, classes {c.class_names}, {c.image_size} px, {c.spatial_dims}D)"


def _are_paths(inputs: Any) -> bool:
    if isinstance(inputs, (str, Path)):
        return True
    return isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(i, (str, Path)) for i in inputs)
