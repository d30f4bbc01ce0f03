"""Diagnosing new image files with a trained checkpoint, and nothing else.

Preprocessing comes from the checkpoint's model card (input size, channels, fit,
normalisation), so it always matches training. A file that cannot be read is
reported by name and skipped; the rest are still predicted.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from meddiag.data.collect import Failure, collect_sources
from meddiag.data.covariates import PatientData
from meddiag.errors import DataError, ModelError, source_failure
from meddiag.evaluation.metrics import predict_labels
from meddiag.models.checkpoint import load_checkpoint
from meddiag.models.checkpoint import load_ood_state
from meddiag.models.inference import logits_to_probs, predict_proba
from meddiag.models.ood import COMBINED, METHOD_LABELS, FeatureReference, WithFeatures, all_scores, logits_and_features, rule_in_force, supports_features
from meddiag.models.registry import get_entry
from meddiag.models.inputs import ModelInput, read_inputs
from meddiag.models.uncertainty import normalised_entropy, predict_with_uncertainty
from meddiag.runfolder import model_checkpoint
from meddiag.serving.export import onnx_network


@dataclass
class Prediction:
    path: str
    predicted: str
    probabilities: dict[str, float]
    sop_instance_uid: str = ""  # DICOM files: which object was diagnosed (an object id, not PHI)
    series_instance_uid: str = ""
    uncertainty: float = 0.0  # normalised predictive entropy, 0 (certain) to 1
    spread: float | None = None  # std over TTA / MC-dropout passes of the predicted class's probability
    abstain: bool | None = None  # True: refer to a human (uncertainty above the model's threshold)
    missing_covariates: list[str] | None = None  # models with covariates: those this case lacked (None: image-only model)
    ood_score: float | None = None  # how unlike the training data (the card's OOD method; None: the model has no rule)
    ood: bool = False  # outside what the model was trained on: do not trust the diagnosis
    ood_reason: str = ""
    # with Predictor.keep_features and an OOD rule: the plain pass's (K,) logits and (D,) features, for shift tests (never written out)
    logits: np.ndarray | None = field(default=None, repr=False)
    features: np.ndarray | None = field(default=None, repr=False)


PART_LABELS = {"mahalanobis": "features", "pixels": "pixel statistics"}


class Predictor:
    """A loaded model ready to diagnose files: ``Predictor.from_run("runs/x").predict(["a.png"])``.

    ``backend="onnx"`` runs the network in ONNX Runtime from the run's export (made on first use,
    and again whenever the weights changed); the PyTorch model stays loaded for explanations.
    ``max_pixels`` refuses, before decoding, files whose header declares more pixels than that.
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 64, backend: str = "torch",
                 max_pixels: int | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.model, self.card = load_checkpoint(checkpoint, map_location=device)
        self.model.to(device)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.backend = backend
        self.keep_features = False  # True: each Prediction keeps its logits and features (a shift test needs them; predict does not)
        self.network = self.model  # what predictions run on
        self.ood_reference = FeatureReference.from_state(load_ood_state(checkpoint)) if self.card.ood else None
        if self.card.ood is not None and not rule_in_force(self.card, self.ood_reference, str(checkpoint)):
            self.card = self.card.model_copy(update={"ood": None})
        self.with_features = (WithFeatures(self.model, get_entry(self.card.model_name).head).eval()
                              if self.card.ood and supports_features(self.card.model_name) else None)
        if backend == "onnx":
            if self.card.mc_dropout:
                raise ModelError("this model averages MC-dropout passes, which need the PyTorch backend "
                                 "(dropout is frozen in an ONNX export): use --backend torch")
            self.network = onnx_network(Path(checkpoint), self.model, self.card)
        elif backend != "torch":
            raise ModelError(f"unknown backend '{backend}': choose torch or onnx")

    @classmethod
    def from_run(cls, run: str | Path, **kwargs: object) -> Predictor:
        return cls(model_checkpoint(run), **kwargs)  # type: ignore[arg-type]

    def predict_arrays(self, images: torch.Tensor, covariates: torch.Tensor | None = None) -> np.ndarray:
        """Probabilities (N, K) for uint8 model input (N, C, H, W) or (N, C, D, H, W)."""
        return self.predict_distribution(images, covariates)["mean"]

    def predict_distribution(self, images: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """``mean`` probabilities (N, K), normalised ``entropy`` (N,) and ``spread`` (N,), with the
        test-time augmentation / MC-dropout passes the model card asks for. ``covariates``: (N, F)
        encoded patient data (see :meth:`encode_covariates`; None: none known). With an OOD rule also
        ``ood_score`` (N,), the plain pass's ``logits`` (N, K) and, where the network has them, ``features`` (N, D)."""
        c = self.card
        onnx_features = getattr(self.network, "gives_features", False)  # an ONNX export with the features output
        if c.ood is not None:  # one plain pass gives the logits and the features the OOD score needs
            split = self.network if onnx_features else (self.with_features or self.model)
            logits, features = logits_and_features(split, c, images, covariates, self.batch_size)
            every = all_scores(logits, features, self.ood_reference, c.task, c.temperature, (c.ood.method,), images, c.ood.scales)
            scores = every[c.ood.method]
        if c.tta or c.mc_dropout:
            dist = predict_with_uncertainty(self.network, c, images, self.batch_size, covariates=covariates)
        elif c.ood is not None and (self.network is self.model or onnx_features):
            probs = logits_to_probs(logits, c.task, c.temperature).numpy()
            dist = {"mean": probs, "entropy": normalised_entropy(probs, c.task), "spread": np.zeros(len(probs))}
        else:
            probs = predict_proba(self.network, images, c.task, c.mean, c.std, self.batch_size, c.temperature, covariates).numpy()
            dist = {"mean": probs, "entropy": normalised_entropy(probs, c.task), "spread": np.zeros(len(probs))}
        if c.ood is not None:
            dist["ood_score"], dist["logits"] = scores, logits.numpy()
            if c.ood.method == "combined":  # each part over its own threshold: which one flagged
                dist["ood_parts"] = np.stack([every[m] / c.ood.scales[m] for m in COMBINED], 1)
            if features is not None:
                dist["features"] = features.numpy()
        return dist

    def case_covariates(self, patients: PatientData | None, source: str | Path) -> tuple[np.ndarray, list[str]] | None:
        """(F,) encoded covariates of the case in ``source`` and the names it lacks (None: an image-only
        model). Raises DataError (naming file, line, column) for a value that cannot be right."""
        schema = self.card.covariates
        if schema is None:
            return None
        table = patients.table_for(schema, source) if patients is not None else schema.empty_table(1)
        return schema.encode(table, warn=patients.source if patients is not None else None)[0], schema.missing_names(table)[0]

    def read(self, path: str | Path) -> list[ModelInput]:
        """The model inputs of one file (or DICOM series folder); raises ``ImageReadError``."""
        return read_inputs(path, self.card, self.max_pixels)

    def predict(self, paths: list[str | Path], patients: PatientData | None = None) -> tuple[list[Prediction], list[Failure]]:
        """Predict every image file in ``paths`` (files or folders); for 3D models every volume
        (NIfTI files, multi-frame DICOM files, and folders holding a DICOM series). ``patients``: the
        cases' covariates, for a model that takes them (cases without a row have them all missing).

        Returns the predictions and, separately, each file that failed with its reason.
        """
        sources, failures = collect_sources(paths, self.card.spatial_dims)
        taken = {str(s) for s in sources}  # a series folder's NIfTI and multi-frame files are volumes of their own
        predictions: list[Prediction] = []
        pending: list[ModelInput] = []
        for i, source in enumerate(sources):
            try:
                items = self.read(source)
            except Exception as exc:  # noqa: BLE001 - whatever one file raises, it alone fails
                failures.append(Failure(str(source), source_failure(exc, source)))
                items = []
            for item in items:
                failures += [Failure(p, r) for p, r in item.excluded if p not in taken]
                try:
                    item.covariates = self.case_covariates(patients, source)
                except DataError as exc:  # a bad value fails this case only
                    failures.append(Failure(str(source), str(exc)))
                    continue
                item.check(self.card)
                pending.append(item)
            if len(pending) >= self.batch_size or (i == len(sources) - 1 and pending):
                predictions += self.predict_inputs(pending)
                pending = []
        finite: list[Prediction] = []
        for p in predictions:
            if all(math.isfinite(v) for v in p.probabilities.values()):
                finite.append(p)
            else:
                failures.append(Failure(p.path, "the model returned NaN or infinite probabilities for this input; no diagnosis"))
        return finite, failures

    def predict_inputs(self, items: list[ModelInput]) -> list[Prediction]:
        """One :class:`Prediction` per input, predicted together."""
        if not items:
            return []
        dist = self.predict_distribution(torch.from_numpy(np.stack([it.array for it in items])), stacked_covariates(items))
        return self.predictions_from(items, dist)

    def predictions_from(self, items: list[ModelInput], dist: dict[str, np.ndarray]) -> list[Prediction]:
        """Predictions for ``items`` from their :meth:`predict_distribution` output."""
        rows = self._rows([Path(it.source) for it in items], dist)
        for row, item in zip(rows, items):
            row.sop_instance_uid, row.series_instance_uid = item.sop_instance_uid, item.series_instance_uid
            if item.covariates is not None:
                row.missing_covariates = item.covariates[1]
        rule = self.card.ood
        scores = dist.get("ood_score")
        for i, (row, item) in enumerate(zip(rows, items)):
            if self.keep_features:
                row.logits = dist["logits"][i] if "logits" in dist else None
                row.features = dist["features"][i] if "features" in dist else None
            reasons = list(item.problems)
            if scores is not None and rule is not None:
                row.ood_score = float(scores[i])
                if not row.ood_score <= rule.threshold:  # NaN too
                    parts = ""
                    if "ood_parts" in dist:
                        parts = "; " + ", ".join(f"{PART_LABELS[m]} {v:.3g}x" for m, v in zip(COMBINED, dist["ood_parts"][i])) + \
                                " their own thresholds"
                    reasons.append(f"{METHOD_LABELS.get(rule.method, rule.method)} score {row.ood_score:.4g} above the model's threshold "
                                   f"{rule.threshold:.4g} (which keeps {rule.keep:.0%} of its validation images{parts})")
            if reasons:
                row.ood, row.ood_reason, row.abstain = True, "; ".join(reasons), True
        return rows

    def _rows(self, paths: list[Path], dist: dict[str, np.ndarray]) -> list[Prediction]:
        c = self.card
        probs = dist["mean"]
        decided = predict_labels(probs, c.task, c.threshold)
        several = bool(c.tta or c.mc_dropout)
        rows = []
        for i, (path, p, d) in enumerate(zip(paths, probs, decided)):
            label = ";".join(n for n, v in zip(c.class_names, d) if v) if c.task == "multilabel" else c.class_names[int(d)]
            u = float(dist["entropy"][i])
            rows.append(Prediction(str(path), label, {n: float(v) for n, v in zip(c.class_names, p)}, uncertainty=u,
                                   spread=float(dist["spread"][i]) if several else None,
                                   abstain=u > c.abstain_threshold if c.abstain_threshold is not None else None))
        return rows


def stacked_covariates(items: list[ModelInput]) -> torch.Tensor | None:
    """(N, F) encoded covariates of ``items`` (None when the model takes none)."""
    if not items or items[0].covariates is None:
        return None
    return torch.from_numpy(np.stack([it.covariates[0] for it in items]))  # type: ignore[index]


def write_predictions_csv(out: str | Path | TextIO, predictions: list[Prediction], class_names: list[str]) -> None:
    """``path,prediction,prob_<class>...,uncertainty,spread,abstain,sop_instance_uid,series_instance_uid``,
    one row per image, to a file path or an open text stream. ``uncertainty``: normalised predictive
    entropy (0-1, 4 significant digits, so that a confident model's tiny values stay comparable with
    its abstention threshold); ``spread``: over TTA/MC-dropout passes (empty without); ``abstain``: 1 to refer the
    case to a human (empty when the model has no abstention rule); UIDs empty for non-DICOM files; for a model
    with covariates, ``missing_covariates``: those the case lacked, separated by ';'."""
    if not isinstance(out, (str, Path)):
        _write_rows(out, predictions, class_names)
        return
    with open(out, "w", newline="") as fh:
        _write_rows(fh, predictions, class_names)


def _write_rows(fh: TextIO, predictions: list[Prediction], class_names: list[str]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    covariates = any(p.missing_covariates is not None for p in predictions)
    writer.writerow(["path", "prediction", *[f"prob_{c}" for c in class_names], "uncertainty", "spread", "abstain",
                     "ood_score", "ood", "ood_reason",
                     "sop_instance_uid", "series_instance_uid", *(["missing_covariates"] if covariates else [])])
    for p in predictions:
        writer.writerow([p.path, p.predicted, *[f"{p.probabilities[c]:.6f}" for c in class_names], f"{p.uncertainty:.4g}",
                         "" if p.spread is None else f"{p.spread:.4g}", "" if p.abstain is None else int(p.abstain),
                         "" if p.ood_score is None else f"{p.ood_score:.6g}", int(p.ood), p.ood_reason,
                         p.sop_instance_uid, p.series_instance_uid,
                         *([";".join(p.missing_covariates or [])] if covariates else [])])
