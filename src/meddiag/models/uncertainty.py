"""Knowing when the model does not know: predictive distributions and their uncertainty.

- Test-time augmentation (``tta=T``): the image and T randomly augmented copies (the training
  augmentation: small rotation, zoom, shift, brightness, contrast) each predicted.
- MC-dropout (``mc_dropout=M``, Gal & Ghahramani 2016): M passes with the network's dropout
  layers left on; only for networks that have dropout.
- Per image: the predictive mean, its entropy (normalised to [0, 1] by log K; for multi-label the
  mean of the findings' binary entropies) and the spread (standard deviation over the passes of
  the probability of the predicted class).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float
from meddiag.errors import ModelError
from meddiag.models.checkpoint import ModelCard
from meddiag.models.fusion import call
from meddiag.models.inference import logits_to_probs, model_device

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in model.modules())


@torch.no_grad()
def predictive_samples(model: nn.Module, card: ModelCard, images: torch.Tensor, tta: int = 0, mc_dropout: int = 0,
                       seed: int = 0, batch_size: int = 256, covariates: torch.Tensor | None = None) -> np.ndarray:
    """(S, N, K) probabilities: the plain prediction first, then ``tta`` augmented and ``mc_dropout``
    dropout passes (``covariates``: (N, F) encoded patient data, the same in every pass)."""
    if mc_dropout and not has_dropout(model):
        raise ModelError(f"{card.model_name} has no dropout layers: MC-dropout needs a network with dropout "
                         "(use test-time augmentation instead)")
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    augment = AugmentConfig()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_unit_float(images[start : start + batch_size].to(device))
        c = covariates[start : start + batch_size].to(device) if covariates is not None else None
        model.eval()
        passes = [_probs(model, normalize(x, card.mean, card.std), card, c)]
        for _ in range(tta):
            passes.append(_probs(model, normalize(augment_batch(x, augment, generator), card.mean, card.std), card, c))
        if mc_dropout:
            for m in model.modules():
                if isinstance(m, DROPOUT_TYPES):
                    m.train()
            for _ in range(mc_dropout):
                passes.append(_probs(model, normalize(x, card.mean, card.std), card, c))
            model.eval()
        out.append(torch.stack(passes))
    return torch.cat(out, dim=1).numpy()


def _probs(model: nn.Module, x: torch.Tensor, card: ModelCard, covariates: torch.Tensor | None = None) -> torch.Tensor:
    return logits_to_probs(call(model, x, covariates).float(), card.task, card.temperature).cpu()


def normalised_entropy(probs: np.ndarray, task: str) -> np.ndarray:
    """(N,) entropy of each probability vector in [0, 1]: divided by log K (single-label), or the
    mean binary entropy over findings (multi-label)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    if task == "multilabel":
        q = np.clip(1 - p, 1e-12, 1.0)
        return (-(p * np.log(p) + q * np.log(q)) / math.log(2)).mean(axis=1)
    return -(p * np.log(p)).sum(axis=1) / math.log(p.shape[1])


def summarise(samples: np.ndarray, task: str) -> dict[str, np.ndarray]:
    """Predictive mean (N, K), normalised entropy of the mean (N,), and spread (N,): the standard
    deviation over passes of the mean's most probable class (0 with a single pass)."""
    mean = samples.mean(axis=0)
    top = mean.argmax(axis=1)
    spread = samples[:, np.arange(mean.shape[0]), top].std(axis=0) if samples.shape[0] > 1 else np.zeros(len(mean))
    return {"mean": mean, "entropy": normalised_entropy(mean, task), "spread": spread}


def predict_with_uncertainty(model: nn.Module, card: ModelCard, images: torch.Tensor, batch_size: int = 256,
                             covariates: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """:func:`summarise` of the passes the model card asks for (its ``tta`` and ``mc_dropout``; a
    single plain pass when both are 0)."""
    samples = predictive_samples(model, card, images, card.tta, card.mc_dropout, batch_size=batch_size, covariates=covariates)
    return summarise(samples, card.task)
