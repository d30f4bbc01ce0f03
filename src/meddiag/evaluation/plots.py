"""Plots of a run: training curves, ROC curves, confusion matrix (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from meddiag.evaluation.metrics import roc_auc  # noqa: E402


def roc_points(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y_true = np.asarray(y_true).astype(bool)
    order = np.argsort(-np.asarray(score), kind="mergesort")
    s, t = np.asarray(score)[order], y_true[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps, fps = np.cumsum(t)[last_of_run], np.cumsum(~t)[last_of_run]
    return np.r_[0.0, fps / max(1, (~y_true).sum())], np.r_[0.0, tps / max(1, y_true.sum())]


def plot_roc(labels: np.ndarray, probs: np.ndarray, task: str, class_names: list[str], path: Path) -> Path:
    """ROC curve of the positive class (binary) or one-vs-rest per class, with AUCs in the legend."""
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    classes = [1] if task == "binary" else range(len(class_names))
    for i in classes:
        truth = labels[:, i] if task == "multilabel" else labels == i
        if truth.all() or not truth.any():
            continue
        fpr, tpr = roc_points(truth, probs[:, i])
        ax.plot(fpr, tpr, lw=1.5, label=f"{class_names[i]} (AUC {roc_auc(truth, probs[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Counts with row-normalised shading; rows are the true class."""
    cm = np.asarray(cm)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * k, 1.8 + 0.6 * k), dpi=120)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(k), [c[:18] for c in class_names], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), [c[:18] for c in class_names], fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss (train and val) and validation AUC/ACC per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.plot(epochs, [h["val_auc"] for h in history], label="val AUC")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="val ACC")
    ax2.set(xlabel="epoch", title="Validation")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
