"""Running a trained model on prepared images: logits to probabilities, in batches."""

from __future__ import annotations

import torch
from torch import nn

from meddiag.data.transforms import normalize, to_unit_float
from meddiag.models.fusion import call


def logits_to_probs(logits: torch.Tensor, task: str, temperature: float = 1.0) -> torch.Tensor:
    """(N, K) logits -> (N, K) probabilities: softmax for single-label, sigmoid for multi-label,
    after dividing the logits by ``temperature`` (temperature scaling; 1 leaves them as they are)."""
    if temperature != 1.0:
        logits = logits / temperature
    return torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without torch parameters, e.g. ONNX Runtime)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def predict_proba(model: nn.Module, images: torch.Tensor, task: str, mean: float, std: float, batch_size: int = 256,
                  temperature: float = 1.0, covariates: torch.Tensor | None = None) -> torch.Tensor:
    """Class probabilities (N, K) float32 for uint8 images (N, C, *spatial), on the model's device.
    ``covariates``: (N, F) encoded patient data for a model that takes them (None: none known)."""
    device = model_device(model)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(to_unit_float(images[start : start + batch_size].to(device)), mean, std)
        c = covariates[start : start + batch_size].to(device) if covariates is not None else None
        out.append(logits_to_probs(call(model, x, c).float(), task, temperature).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
