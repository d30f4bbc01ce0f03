"""How many test inputs the model's out-of-distribution rule flags, and the metrics without them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from meddiag.data.channels import match_channels
from meddiag.data.dataset import Split
from meddiag.evaluation.metrics import classification_metrics
from meddiag.models.checkpoint import ModelCard, load_ood_state
from meddiag.models.fusion import covariate_tensor
from meddiag.models.ood import FeatureReference, all_scores, logits_and_features, rule_in_force


def ood_summary(model: nn.Module, card: ModelCard, checkpoint: Path, part: Split, probs: np.ndarray) -> dict | None:
    """The card's OOD rule on ``part`` (whose probabilities are ``probs``): inputs flagged, and AUC and
    accuracy on all inputs and on those not flagged (None: the rule cannot be applied, warned)."""
    rule = card.ood
    assert rule is not None
    reference = FeatureReference.from_state(load_ood_state(checkpoint))
    if not rule_in_force(card, reference, str(checkpoint)):
        return None
    images = match_channels(part.images, card.in_channels)
    logits, features = logits_and_features(model, card, images, covariate_tensor(card.covariates, part.covariates))
    scores = all_scores(logits, features, reference, card.task, card.temperature, (rule.method,), images, rule.scales)[rule.method]
    flagged = ~(scores <= rule.threshold)
    labels = part.labels.numpy()

    def headline(index: np.ndarray) -> dict:
        if not index.any():
            return {"n": 0, "auc": None, "acc": None}
        m = classification_metrics(labels[index], probs[index], card.task, card.class_names, card.threshold)
        return {"n": int(index.sum()), "auc": m["auc"], "acc": m["acc"]}

    return {"method": rule.method, "threshold": rule.threshold, "keep": rule.keep, "val_flagged": rule.val_flagged,
            "n": len(labels), "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()) if len(labels) else 0.0,
            "all": headline(np.ones(len(labels), dtype=bool)), "not_flagged": headline(~flagged),
            "score_quantiles": {q: float(np.quantile(scores, q / 100)) for q in (5, 50, 95)} if len(scores) else {}}
