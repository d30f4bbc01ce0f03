"""What the patient data contributed to one prediction: integrated gradients over the covariates.

Integrated gradients (Sundararajan et al. 2017) of the explained class's probability with respect to
the encoded covariates, along the straight path from the *all-missing* encoding (the patient whose
data is unknown: the baseline the model was trained on by covariate dropout) to the case's own, with
the image held fixed. Each feature's attribution is summed per covariate, so a number reads as "how
much knowing this covariate moved the probability"; the attributions add up (to the integration
error) to P(class | image, covariates) - P(class | image alone).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from meddiag.models.checkpoint import ModelCard
from meddiag.models.inference import logits_to_probs

STEPS = 32


def covariate_attributions(model: nn.Module, card: ModelCard, x: torch.Tensor, covariates: torch.Tensor, target: int,
                           steps: int = STEPS) -> list[dict]:
    """Per covariate its attribution to P(``target``) for one case, largest first.

    ``x``: (1, C, *spatial) float, normalised (as the network sees it); ``covariates``: (1, F) encoded."""
    schema = card.covariates
    assert schema is not None
    base = torch.from_numpy(schema.missing_row())[None]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint rule
    path = (base + alphas[:, None] * (covariates.float() - base)).requires_grad_(True)
    model.eval()
    with torch.enable_grad():
        logits = model(x.expand(steps, *x.shape[1:]), path)
        probs = logits_to_probs(logits.float(), card.task, card.temperature)[:, target]
        (grads,) = torch.autograd.grad(probs.sum(), path)
    per_feature = ((covariates.float() - base)[0] * grads.mean(0)).detach().numpy()
    out = [{"covariate": name, "attribution": float(per_feature[index].sum())}
           for name, index in schema.column_features().items()]
    out.sort(key=lambda r: -abs(r["attribution"]))
    return out


def attribution_text(attributions: list[dict], k: int = 3) -> str:
    """'age +0.08, site -0.03, sex +0.01': the ``k`` largest, for a caption."""
    return ", ".join(f"{a['covariate']} {a['attribution']:+.2f}" for a in attributions[:k] if np.isfinite(a["attribution"]))
