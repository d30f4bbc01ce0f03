"""Settling how a trained model decides, on validation data: temperature scaling and the
operating point (threshold). Both are stored in the checkpoint's model card, so ``evaluate``,
``predict`` and the report all use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from meddiag.data.dataset import Split
from meddiag.errors import ConfigError
from meddiag.evaluation import stats
from meddiag.evaluation.evaluate import evaluate_split
from meddiag.models.checkpoint import ModelCard, load_checkpoint, update_card
from meddiag.models.uncertainty import normalised_entropy


def tune_decision(checkpoint: Path, val: Split, *, calibrate: bool, operating_point: str | None,
                  coverage: float | None = None) -> ModelCard:
    """Fit a temperature (``calibrate``), choose the threshold by ``operating_point`` (``youden``,
    ``sens90``, ...) and the abstention threshold for ``coverage`` (the share of cases to answer,
    the most uncertain referred) on the validation split ``val``; write them into ``checkpoint``."""
    model, card = load_checkpoint(checkpoint)
    if operating_point is not None and card.task != "binary":
        raise ConfigError(f"--operating-point chooses one threshold for a binary task; this task is {card.task} "
                          "(the report gives one-vs-rest operating points for every class)")
    changes: dict = {}
    base = card.model_copy(update={"temperature": 1.0})
    _, probs = evaluate_split(model, base, val)
    labels = val.labels.numpy()
    multilabel = card.task == "multilabel"
    if calibrate:
        scores = stats.logit(probs) if multilabel else np.log(np.clip(probs, 1e-12, 1.0))
        changes["temperature"] = stats.fit_temperature(scores, labels, multilabel)
        probs = stats.apply_temperature(probs, changes["temperature"], multilabel)
    if operating_point is not None:
        changes["threshold"] = stats.choose_threshold(labels == 1, probs[:, 1], operating_point)
        changes["operating_point"] = operating_point
    if coverage is not None:
        changes["coverage"] = coverage
        changes["abstain_threshold"] = stats.abstention_threshold(normalised_entropy(probs, card.task), coverage)
    return update_card(checkpoint, **changes) if changes else card
