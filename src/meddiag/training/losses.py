"""Losses and sampling for imbalanced (and incompletely labelled) data.

- ``class_weights="auto"``: single-label tasks weight each class by N / (K n_c) (scikit-learn's
  "balanced"); multi-label tasks weight each label's positives by n_negative / n_positive.
- ``loss="focal"``: focal loss (Lin et al. 2017), FL = -(1 - p_t)^gamma log p_t, down-weighting
  the easy, mostly majority-class examples; combines with class weights.
- ``sampler="balanced"``: each training image drawn with probability inversely proportional to
  its class's frequency, so every class is seen about equally often per epoch.
- Multi-label targets may be NaN (finding not recorded): those entries are left out of the loss,
  never counted as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def auto_class_weights(labels: torch.Tensor, num_classes: int, task: str) -> list[float]:
    """Per-class weights from the training labels (see the module docstring)."""
    if task == "multilabel":
        known = torch.isfinite(labels)
        pos = torch.where(known, labels, torch.zeros_like(labels)).sum(0)
        neg = known.sum(0) - pos
        return (neg / pos.clamp(min=1)).tolist()
    counts = torch.bincount(labels.long(), minlength=num_classes).float()
    return (labels.numel() / (num_classes * counts.clamp(min=1))).tolist()


def balanced_sample_weights(labels: torch.Tensor, task: str) -> torch.Tensor:
    """A sampling weight per training image, inversely proportional to its class's frequency
    (multi-label: the mean over its positive labels; images with none count as one more class)."""
    if task != "multilabel":
        counts = torch.bincount(labels.long())
        return 1.0 / counts[labels.long()].double()
    y = torch.nan_to_num(labels, nan=0.0)
    pos_counts = y.sum(0).clamp(min=1)
    none = y.sum(1) == 0
    per_image = (y / pos_counts).sum(1) / y.sum(1).clamp(min=1)
    return torch.where(none, torch.full_like(per_image, 1.0 / max(1, int(none.sum()))), per_image).double()


class DiagnosisLoss(nn.Module):
    """Cross-entropy (single-label) or binary cross-entropy (multi-label), optionally focal and
    class-weighted, with unknown multi-label targets (NaN) masked out."""

    def __init__(self, task: str, kind: str = "ce", gamma: float = 2.0, weights: list[float] | None = None) -> None:
        super().__init__()
        if kind not in ("ce", "focal"):
            raise ValueError(f"loss must be ce or focal, not '{kind}'")
        self.task, self.kind, self.gamma = task, kind, gamma
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) if weights else None)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.task == "multilabel":
            return self._multilabel(logits, labels.float())
        ce = F.cross_entropy(logits, labels, reduction="none")
        weight = self.weights[labels] if self.weights is not None else torch.ones_like(ce)
        if self.kind == "focal":
            ce = (1 - torch.exp(-ce)).pow(self.gamma) * ce
        return (weight * ce).sum() / weight.sum()

    def _multilabel(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        known = torch.isfinite(labels)
        y = torch.where(known, labels, torch.zeros_like(labels))
        pos_weight = self.weights if self.weights is not None else None
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none", pos_weight=pos_weight)
        if self.kind == "focal":
            p = torch.sigmoid(logits)
            p_t = torch.where(y > 0.5, p, 1 - p)
            bce = (1 - p_t).pow(self.gamma) * bce
        mask = known.float()
        return (bce * mask).sum() / mask.sum().clamp(min=1)
