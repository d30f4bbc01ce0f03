"""Plots of a run: training curves, ROC curves, confusion matrix (PNG, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from meddiag.evaluation.metrics import roc_auc
from meddiag.evaluation.stats import roc_curve


def subplots(*grid: int, figsize: tuple[float, float], dpi: int, squeeze: bool = True):  # noqa: ANN201 - (Figure, axes)
    """A figure and its axes, as ``pyplot.subplots`` gives them, but outside pyplot: no backend is chosen and
    no global figure state is touched, so meddiag draws the same in a notebook, a server and a terminal."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def roc_series(labels: np.ndarray, probs: np.ndarray, task: str, class_names: list[str]) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """(class name, fpr, tpr, AUC) of each curve :func:`plot_roc` draws: the positive class
    (binary), else one-vs-rest per class or finding; classes without both outcomes are left out."""
    series = []
    for i in [1] if task == "binary" else range(len(class_names)):
        if task == "multilabel":
            recorded = ~np.isnan(labels[:, i])
            truth, score = labels[recorded, i] > 0.5, probs[recorded, i]
        else:
            truth, score = labels == i, probs[:, i]
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        series.append((class_names[i], fpr, tpr, roc_auc(truth, score)))
    return series


def plot_roc(labels: np.ndarray, probs: np.ndarray, task: str, class_names: list[str], path: Path) -> Path:
    """ROC curve of the positive class (binary) or one-vs-rest per class, with AUCs in the legend.
    Multi-label findings not recorded for an image (NaN) leave that image out of the finding's
    curve, as they are left out of its AUC in the report."""
    fig, ax = subplots(figsize=(5, 5), dpi=120)
    for name, fpr, tpr, auc in roc_series(labels, probs, task, class_names):
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title="ROC curve")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], path: Path) -> Path:
    """Counts with row-normalised shading; rows are the true class."""
    cm = np.asarray(cm)
    k = len(class_names)
    fig, ax = subplots(figsize=(2.2 + 0.6 * k, 1.8 + 0.6 * k), dpi=120)
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(k), [c[:18] for c in class_names], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), [c[:18] for c in class_names], fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return save_figure(fig, path)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss (train and val) and validation AUC/ACC per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(9, 3.5), dpi=120)
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
    return save_figure(fig, path)


def plot_precision_recall(truth: np.ndarray, probs: np.ndarray, classes: list[int], class_names: list[str], path: Path) -> Path:
    """Precision-recall curve per reported class, with average precision and prevalence."""
    from meddiag.evaluation.stats import average_precision, precision_recall_curve

    fig, ax = subplots(figsize=(5, 5), dpi=120)
    for i in classes:
        known = np.isfinite(truth[:, i])
        t, p = truth[known, i].astype(bool), probs[known, i]
        if not t.any():
            continue
        recall, precision = precision_recall_curve(t, p)
        ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="post", lw=1.5,
                label=f"{class_names[i]} (AP {average_precision(t, p):.3f}, prevalence {t.mean():.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01), title="Precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(curves: dict[str, list[dict]], path: Path, xlabel: str = "predicted probability") -> Path:
    """Reliability diagram: observed frequency against mean predicted probability per bin."""
    fig, ax = subplots(figsize=(5, 5), dpi=120)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for name, bins in curves.items():
        ax.plot([b["confidence"] for b in bins], [b["observed"] for b in bins], marker="o", ms=3, lw=1.5, label=name)
    ax.set(xlabel=xlabel, ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title="Reliability (15 equal-mass bins)")
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_decision_curve(curve: dict, path: Path) -> Path:
    """Net benefit of the model against treating everyone and no one, over threshold probabilities."""
    fig, ax = subplots(figsize=(6, 4), dpi=120)
    t = curve["threshold"]
    ax.plot(t, curve["model"], lw=1.8, label="model")
    ax.plot(t, curve["treat_all"], lw=1, c="grey", label="treat all")
    ax.plot(t, curve["treat_none"], lw=1, c="black", ls="--", label="treat none")
    top = max(max(curve["model"]), max(curve["treat_all"]), 0.01)
    ax.set(xlabel="threshold probability", ylabel="net benefit", xlim=(0, 1), ylim=(-0.05 * top - 0.01, top * 1.1),
           title="Decision curve")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_risk_coverage(selective: dict, path: Path) -> Path:
    """Error among the cases answered against the share answered (most certain first)."""
    fig, ax = subplots(figsize=(5.5, 4), dpi=120)
    curve = selective["curve"]
    ax.plot(curve["coverage"], curve["risk"], lw=1.8, label="answer the most certain first")
    rule = selective.get("rule")
    if rule:
        ax.scatter([rule["coverage"]], [rule["error_answered"]], c="red", zorder=3, label="the model's abstention rule")
    ax.set(xlabel="coverage (share of cases answered)", ylabel="error among answered", xlim=(0, 1.01), title="Risk-coverage")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_fusion(fusion: dict, path: Path, top: int = 15) -> Path:
    """Left: the fused model's AUC as more test covariates are withheld, against the covariates-only
    model; right: each covariate block's importance (AUC lost when it alone is withheld)."""
    fig, (left, right) = subplots(1, 2, figsize=(10, 4), dpi=120)
    curve = fusion["robustness"]
    left.plot([100 * r["withheld"] for r in curve], [r["auc"] for r in curve], marker="o", lw=1.8, label="fused model")
    for name, m in fusion["models"].items():
        if name.startswith("covariates only") and m.get("auc") is not None:
            left.axhline(m["auc"], c="grey", ls="--", lw=1, label=name)
    left.set(xlabel="test covariates withheld (%)", ylabel="AUC", title="Robustness to missing covariates")
    left.legend(fontsize=8)
    rows = [r for r in fusion["importance"] if r.get("auc_lost") is not None][:top][::-1]
    right.barh([r["covariate"] for r in rows], [r["auc_lost"] for r in rows], color="#4a7bb7")
    right.axvline(0, c="black", lw=0.8)
    right.set(xlabel="AUC lost when withheld from every test case", title="Covariate importance")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gallery(images: list[np.ndarray], captions: list[str], path: Path, title: str, columns: int = 4) -> Path:
    """A grid of uint8 images (H, W) or (H, W, 3), each with its caption."""
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_shift(reference_scores: np.ndarray | None, batch_scores: np.ndarray | None, threshold: float | None, method: str,
               classes: list[str], reference_share: list[float], batch_share: list[float], path: Path) -> Path:
    """A batch against the model's validation reference: the OOD scores' histograms (with the flag threshold)
    and the predicted-class shares side by side."""
    panels = 2 if reference_scores is not None and batch_scores is not None else 1
    fig, axes = subplots(1, panels, figsize=(5.2 * panels, 3.4), dpi=100, squeeze=False)
    if panels == 2:
        ax = axes[0, 0]
        both = np.concatenate([reference_scores, batch_scores])
        finite = both[np.isfinite(both)]
        wide = finite.size and finite.min() > 0 and finite.max() > 100 * finite.min()  # far inputs score orders of magnitude higher
        bins = (np.geomspace(finite.min(), finite.max(), 41) if wide else np.histogram_bin_edges(finite, bins=40)) if finite.size else 10
        if wide:
            ax.set_xscale("log")
        for values, label in ((reference_scores, "validation (reference)"), (batch_scores, "this batch")):
            shown = values[np.isfinite(values)]
            ax.hist(shown, bins=bins, weights=np.full(len(shown), 1 / max(len(shown), 1)), alpha=0.55, label=label)
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="#b00020", linestyle="--", label="flag threshold")
        ax.set_xlabel(f"{method} score (higher: more unusual)")
        ax.set_ylabel("share of inputs")
        ax.legend(fontsize=8)
    ax = axes[0, panels - 1]
    at = np.arange(len(classes))
    ax.bar(at - 0.2, reference_share, 0.4, label="validation (reference)")
    ax.bar(at + 0.2, batch_share, 0.4, label="this batch")
    ax.set_xticks(at, classes, rotation=30 if len(classes) > 4 else 0, ha="right" if len(classes) > 4 else "center", fontsize=8)
    ax.set_ylabel("share predicted")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: Path | BinaryIO) -> Path | BinaryIO:
    """Write ``fig`` as a PNG at ``path`` (folders made as needed; or into an open binary
    stream) and free it."""
    fig.tight_layout()
    if not hasattr(path, "write"):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()
    return path
