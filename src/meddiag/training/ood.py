"""Fitting a run's out-of-distribution rule: the reference from its training split, the threshold
from its validation split (see :mod:`meddiag.models.ood`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from meddiag.data.channels import match_channels
from meddiag.data.dataset import ImageData
from meddiag.errors import ConfigError
from meddiag.models.checkpoint import OODRule, load_checkpoint, save_ood_reference
from meddiag.models.fusion import covariate_tensor
from meddiag.models.ood import (COMBINED, DEFAULT_METHOD, FEATURE_METHODS, METHODS, FeatureReference, ShiftReference, all_scores, keep_threshold,
                                logits_and_features)

DEFAULT_KEEP = 0.95
SMALL_VALIDATION = 100  # fewer validation images than this: the threshold is a noisy quantile (warned)


def fit_ood(checkpoint: Path, data: ImageData, keep: float = DEFAULT_KEEP, method: str | None = None) -> OODRule:
    """Fit the reference on ``data``'s training split, choose the flag threshold on its validation split so
    that ``keep`` of it passes, and store both in ``checkpoint``, with a sample of the validation split for
    measuring a batch's shift (:class:`~meddiag.models.ood.ShiftReference`). ``method`` None: the default (feature
    scores where the network has them, else energy)."""
    if not 0.5 <= keep < 1:
        raise ConfigError(f"--ood-keep must be between 0.5 and 1 (the share of in-distribution inputs kept), not {keep}")
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown OOD method '{method}'; choose {', '.join(METHODS)}")
    model, card = load_checkpoint(checkpoint)

    def pass_over(split: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        part = data.splits[split]
        images = match_channels(part.images, card.in_channels)
        return *logits_and_features(model, card, images, covariate_tensor(card.covariates, part.covariates)), images

    _, train_features, train_images = pass_over("train")
    reference = None
    if train_features is not None:
        reference = FeatureReference.fit(train_features.numpy(), data.splits["train"].labels.numpy(), card.num_classes,
                                         images=None if card.model_name == "tabular" else train_images)  # it never sees the image
    val_logits, val_features, val_images = pass_over("val")
    scores = all_scores(val_logits, val_features, reference, card.task, card.temperature, images=val_images)
    thresholds = {m: keep_threshold(s, keep) for m, s in scores.items()}
    scales = {m: thresholds[m] for m in COMBINED if m in thresholds}
    if len(scales) == len(COMBINED):
        scores.update(all_scores(val_logits, val_features, reference, card.task, card.temperature, ("combined",), val_images, scales))
        thresholds["combined"] = keep_threshold(scores["combined"], keep)
    chosen = method or next(m for m in (DEFAULT_METHOD, "mahalanobis", "energy") if m in thresholds)
    if chosen in FEATURE_METHODS and reference is None:
        raise ConfigError(f"{card.model_name} has no final linear layer to take features from: use energy or msp")
    n_val = len(data.splits["val"])
    if n_val < SMALL_VALIDATION:
        warnings.warn(f"the OOD threshold rests on {n_val} validation images: the share of new in-distribution images it "
                      f"flags may be far from {1 - keep:.0%} (a larger validation split, or --ood-keep nearer 1, helps)",
                      stacklevel=2)
    if chosen not in thresholds:
        raise ConfigError(f"the {chosen} OOD score cannot be computed for this model; choose one of {', '.join(thresholds)}")
    rule = OODRule(method=chosen, threshold=thresholds[chosen], keep=keep, scales=scales if chosen == "combined" else {},
                   val_flagged=float(np.mean(scores[chosen] > thresholds[chosen])), thresholds=thresholds,
                   reference_images=len(data.splits["train"]), validation_images=len(data.splits["val"]))
    shift = ShiftReference.sample(val_logits, val_features, scores[chosen])
    save_ood_reference(checkpoint, reference, rule, shift)
    return rule
