"""Example heatmaps for the report: where the model looked on the test cases it got right most surely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from meddiag.data.dataset import Split
from meddiag.evaluation.plots import plot_gallery
from meddiag.explain.render import overlay_image, volume_figure
from meddiag.explain.saliency import method_label, probabilities, saliency_maps
from meddiag.models.checkpoint import ModelCard
from meddiag.models.fusion import covariate_tensor


def write_example_heatmaps(model: nn.Module, card: ModelCard, split: Split, path: Path, n: int = 4,
                           method: str = "gradcam") -> Path | None:
    """A PNG of ``method`` maps over the ``n`` images of ``split`` that show the finding (binary: the
    positive class; otherwise each image's true class) and get the highest probability for it: what
    the model looks at when it is right. 2D: a gallery of overlays; 3D: the three planes of the top
    volume. None when no image qualifies (e.g. a multi-label task, or no positive case)."""
    if card.task == "multilabel" or len(split) == 0:
        return None
    if card.model_name == "tabular":  # no image branch, no heatmap
        return None
    labels = split.labels.numpy()
    covariates = covariate_tensor(card.covariates, split.covariates)
    with torch.inference_mode():
        probs = np.concatenate([probabilities(model, split.images[i:i + 64], card,
                                              covariates[i:i + 64] if covariates is not None else None)
                                for i in range(0, len(split), 64)])
    target = np.ones_like(labels) if card.task == "binary" else labels
    score = probs[np.arange(len(labels)), target]
    candidates = np.flatnonzero(labels == target)
    if not len(candidates):
        return None
    chosen = candidates[np.argsort(-score[candidates], kind="stable")][: (n if card.spatial_dims == 2 else 1)]
    x = split.images[torch.as_tensor(chosen)]
    heat = saliency_maps(model, card, x, method, [int(target[i]) for i in chosen],
                         covariates=covariates[torch.as_tensor(chosen)] if covariates is not None else None)
    label = method_label(method, card.model_name)
    if card.spatial_dims == 3:
        return volume_figure(x[0, 0].numpy(), heat[0], f"{label} of {card.class_names[target[chosen[0]]]} "
                             f"(P {score[chosen[0]]:.3f}), the test volume the model is surest of", path)
    images = [x[i].numpy() for i in range(len(chosen))]
    images = [im[0] if im.shape[0] == 1 else np.moveaxis(im, 0, -1) for im in images]
    overlays = [overlay_image(im, h, fit="stretch") for im, h in zip(images, heat)]
    captions = [f"{card.class_names[target[i]]}: P {score[i]:.3f}\n#{i}" for i in chosen]
    return plot_gallery(overlays, captions, path, f"{label}: the test images the model is surest show the finding")
