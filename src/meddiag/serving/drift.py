"""Has the data a model now sees drifted from what it was validated on? ``meddiag drift`` for a batch of
files, and the server's rolling window (``GET /v1/drift``). The tests are :mod:`meddiag.evaluation.drift`'s;
the reference is the checkpoint's validation sample (:class:`~meddiag.models.ood.ShiftReference`)."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import meddiag
from meddiag.data.covariates import PatientData
from meddiag.data.manifest import manifest_paths
from meddiag.errors import MeddiagError
from meddiag.evaluation.drift import ALPHA, MIN_BATCH, PERMUTATIONS, batch_shift, shift_sentence
from meddiag.models.checkpoint import ModelCard, load_ood_state
from meddiag.models.ood import ShiftReference
from meddiag.runfolder import RunFolder, write_text_atomic
from meddiag.serving.predictor import Prediction, Predictor

ATYPICAL = 20  # files listed as the most atypical


def shift_reference(checkpoint: Path, card: ModelCard) -> ShiftReference:
    """The checkpoint's shift reference, or MeddiagError saying how to make one."""
    reference = ShiftReference.from_state(load_ood_state(checkpoint)) if card.ood is not None else None
    if reference is None:
        raise MeddiagError(f"{checkpoint} has no shift reference (a run made before meddiag stored one, or trained with "
                           "--ood-keep none): `meddiag calibrate-ood RUN` makes it from the run's own data, without retraining")
    return reference


def drift_report(run: str | Path, paths: list[str | Path], out: str | Path | None = None, permutations: int = PERMUTATIONS,
                 alpha: float = ALPHA, seed: int = 0, predictor: Predictor | None = None,
                 patients: PatientData | None = None) -> tuple[dict[str, Any], Path]:
    """Test the images under ``paths`` (files, folders, DICOM series, CSV manifests' ``path`` columns) for
    shift against ``run``'s reference (``patients``: the cases' covariates, for a model that takes them; by
    default a manifest's own columns);
    writes ``drift.json``, ``drift.html``, ``drift_scores.csv`` (every input's OOD score) and
    ``plots/shift.png`` to ``out`` (default ``RUN/drift``). Files that cannot be read are listed, the rest
    tested. Returns the record and the folder."""
    predictor = predictor or Predictor.from_run(run)
    checkpoint = Path(predictor.checkpoint)
    reference = shift_reference(checkpoint, predictor.card)
    files: list[str | Path] = []
    for path in paths:
        if Path(path).suffix.lower() == ".csv" and Path(path).is_file():
            files += manifest_paths(path)
            if patients is None and predictor.card.covariates is not None:
                patients = PatientData.from_csv(path)
        else:
            files.append(path)
    predictor.keep_features = True
    predictions, failures = predictor.predict(files, patients)
    if len(predictions) < MIN_BATCH:
        raise MeddiagError(f"{len(predictions)} input(s) could be read under {', '.join(map(str, paths))} "
                           f"({len(failures)} failed): a shift test needs at least {MIN_BATCH}")
    card = predictor.card
    logits = np.stack([p.logits for p in predictions])  # type: ignore[misc]
    features = np.stack([p.features for p in predictions]) if predictions[0].features is not None else None  # type: ignore[misc]
    scores = np.array([p.ood_score for p in predictions], dtype=np.float64) if card.ood is not None else None
    result = batch_shift(reference, card, logits, features, scores, permutations, alpha, seed)
    folder = Path(out) if out else RunFolder.of(checkpoint).root / "drift"
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(predictions, key=lambda p: -(p.ood_score if p.ood_score is not None else 0.0))
    record = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "meddiag_version": meddiag.__version__,
              "run": str(RunFolder.of(checkpoint).root), "model": card.model_name, "data": [str(p) for p in paths],
              "n_inputs": len(predictions), "sentence": shift_sentence(result), "result": result,
              "atypical": [_atypical(p) for p in order[:ATYPICAL]],
              "failures": [{"path": f.path, "reason": f.reason} for f in failures]}
    _write_scores(folder / "drift_scores.csv", order)
    plot = _plot(reference, card, scores, result, folder / "plots" / "shift.png")
    write_text_atomic(folder / "drift.json", json.dumps(record, indent=2))
    from meddiag.evaluation.html import drift_page

    write_text_atomic(folder / "drift.html", drift_page(record, plot))
    return record, folder


def _atypical(p: Prediction) -> dict[str, Any]:
    return {"path": p.path, "score": p.ood_score, "ood": p.ood, "reason": p.ood_reason, "prediction": p.predicted}


def _write_scores(path: Path, predictions: list[Prediction]) -> None:
    rows = [["path", "ood_score", "ood", "ood_reason", "prediction"]]
    rows += [[p.path, "" if p.ood_score is None else f"{p.ood_score:.6g}", int(p.ood), p.ood_reason, p.predicted] for p in predictions]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _plot(reference: ShiftReference, card: ModelCard, scores: np.ndarray | None, result: dict, path: Path) -> Path | None:
    from meddiag.evaluation.plots import plot_shift

    classes = result["tests"]["predicted_classes"]
    rule = card.ood
    return plot_shift(reference.scores.numpy() if reference.scores is not None else None, scores,
                      rule.threshold if rule else None, rule.method if rule else "", card.class_names,
                      [classes["reference_share"][c] for c in card.class_names], [classes["batch_share"][c] for c in card.class_names], path)


class ShiftMonitor:
    """The server's rolling window of the last ``window`` inputs (their logits, features and OOD scores;
    never a file name or an image), tested against the reference on request. Thread-safe."""

    def __init__(self, reference: ShiftReference, card: ModelCard, window: int = 200, permutations: int = 500,
                 alpha: float = ALPHA) -> None:
        self.reference, self.card, self.window = reference, card, window
        self.permutations, self.alpha = permutations, alpha
        self._rows: deque[tuple[np.ndarray, np.ndarray | None, float | None]] = deque(maxlen=window)
        self._seen = 0
        self._lock = threading.Lock()

    def add(self, dist: dict[str, np.ndarray]) -> None:
        """Record the inputs of one :meth:`Predictor.predict_distribution` output."""
        if "logits" not in dist:
            return
        features, scores = dist.get("features"), dist.get("ood_score")
        with self._lock:
            for i in range(len(dist["logits"])):
                self._rows.append((dist["logits"][i], features[i] if features is not None else None,
                                   float(scores[i]) if scores is not None else None))
                self._seen += 1

    def status(self) -> dict[str, Any]:
        """``GET /v1/drift``: the window's shift test, or how many inputs it still needs."""
        with self._lock:
            rows, seen = list(self._rows), self._seen
        base = {"window": self.window, "inputs_seen": seen, "in_window": len(rows), "min_inputs": MIN_BATCH,
                "reference_n": len(self.reference)}
        if len(rows) < MIN_BATCH:
            return {**base, "status": "collecting", "shift": None, "p_value": None}
        logits = np.stack([r[0] for r in rows])
        features = np.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        scores = np.array([r[2] for r in rows], dtype=np.float64) if rows[0][2] is not None else None
        result = batch_shift(self.reference, self.card, logits, features, scores, self.permutations, self.alpha)
        return {**base, "status": "shift" if result["shift"] else "no shift", "shift": result["shift"], "p_value": result["p_value"],
                "sentence": shift_sentence(result), "tests": result["tests"]}
