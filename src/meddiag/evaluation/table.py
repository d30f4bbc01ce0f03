"""Per-image predictions of one split, as written to (and read back from) ``predictions*.csv``.

The report is computed from these files alone, so ``meddiag report`` can rebuild it without
the model or the images. Columns: ``image,label,prediction,prob_<class>...``, then ``patient``
(a one-way key, where patients are known) and the subgroup attributes asked for.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiag.evaluation.metrics import predict_labels

FIXED = ("image", "label", "prediction", "patient")


@dataclass
class PredictionTable:
    """labels: (N,) class indices, or (N, K) 0/1 with NaN for unknown (multi-label).
    probs: (N, K). groups: patient keys or None. meta: subgroup attributes by column."""

    images: list[str]
    labels: np.ndarray
    probs: np.ndarray
    groups: list[str] | None = None
    meta: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def truth_matrix(self) -> np.ndarray:
        """(N, K) float truth per class: one-hot for single-label tasks, NaN where unknown."""
        if self.labels.ndim == 2:
            return self.labels.astype(np.float64)
        return np.eye(self.probs.shape[1])[self.labels.astype(int)]

    def subset(self, index: np.ndarray) -> PredictionTable:
        idx = np.asarray(index, dtype=int)
        return PredictionTable(
            [self.images[i] for i in idx], self.labels[idx], self.probs[idx],
            [self.groups[i] for i in idx] if self.groups is not None else None,
            {k: [v[i] for i in idx] for k, v in self.meta.items()},
        )

    def write(self, path: Path, class_names: list[str], task: str, threshold: float) -> None:
        decided = predict_labels(self.probs, task, threshold)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            extra = (["patient"] if self.groups is not None else []) + list(self.meta)
            writer.writerow(["image", "label", "prediction", *[f"prob_{c}" for c in class_names], *extra])
            for i in range(len(self)):
                if task == "multilabel":
                    truth = ";".join(_label_text(c, v) for c, v in zip(class_names, self.labels[i]) if not (v == 0))
                    pred = ";".join(c for c, v in zip(class_names, decided[i]) if v)
                else:
                    truth, pred = class_names[int(self.labels[i])], class_names[int(decided[i])]
                row = [self.images[i], truth, pred, *[f"{p:.6f}" for p in self.probs[i]]]
                row += ([self.groups[i]] if self.groups is not None else []) + [self.meta[k][i] for k in self.meta]
                writer.writerow(row)

    @classmethod
    def read(cls, path: Path, class_names: list[str], task: str) -> PredictionTable:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            return cls([], np.zeros(0, int), np.zeros((0, len(class_names))))
        probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
        if task == "multilabel":
            labels = np.array([_parse_multilabel(r["label"], class_names) for r in rows])
        else:
            index = {c: i for i, c in enumerate(class_names)}
            labels = np.array([index[r["label"]] for r in rows])
        known = set(FIXED) | {f"prob_{c}" for c in class_names}
        meta = {k: [r[k] for r in rows] for k in rows[0] if k not in known}
        groups = [r["patient"] for r in rows] if "patient" in rows[0] else None
        return cls([r["image"] for r in rows], labels, probs, groups, meta)


def _label_text(name: str, value: float) -> str:
    """Multi-label truth: a present finding by name, an unknown one as ``name?``."""
    return f"{name}?" if math.isnan(float(value)) else name


def _parse_multilabel(text: str, class_names: list[str]) -> list[float]:
    items = {t for t in text.split(";") if t}
    return [math.nan if f"{c}?" in items else float(c in items) for c in class_names]
