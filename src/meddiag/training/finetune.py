"""Fine-tuning from initial weights: which parameters are the backbone, how fast each part learns, and when.

The *backbone* is what the initial weights filled (the load report's ``backbone_parameters``);
everything else — the new head, a covariate encoder, layers the file lacked — is the *head* here.

- ``freeze_epochs = N``: for the first N epochs only the head learns (the backbone's learning rate
  is 0 and its batch-norm layers keep the statistics they came with), then everything does, the
  backbone after a warm-up of its own; ``freeze_backbone`` freezes it for the whole run (a linear
  probe: its parameters need no gradients at all, so the run is also cheaper).
- ``backbone_lr_mult``: the backbone learns at this multiple of the learning rate.
- ``warmup_epochs``: the learning rate rises linearly from near 0 over these epochs (per step), then
  follows the run's schedule (cosine, step or none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FineTuning:
    freeze_epochs: int = 0
    backbone_lr_mult: float = 1.0
    warmup_epochs: int = 0
    frozen_for_good: bool = False  # freeze_backbone: the backbone never learns


def schedule_factor(epoch: float, epochs: int, scheduler: str) -> float:
    """The run's schedule at (fractional) ``epoch`` of ``epochs``, as a multiple of the learning rate."""
    if scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / max(1, epochs)))
    if scheduler == "step":
        return 0.1 ** ((epoch >= max(1, epochs // 2)) + (epoch >= max(1, epochs * 3 // 4)))
    return 1.0


def lr_factors(plan: FineTuning, epochs: int, steps_per_epoch: int, scheduler: str) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """Per-step learning-rate multipliers of the head's and the backbone's parameter groups."""
    spe = max(1, steps_per_epoch)

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / (plan.warmup_epochs * spe)) if plan.warmup_epochs else 1.0

    def head(step: int) -> float:
        return warm(step) * schedule_factor(step / spe, epochs, scheduler)

    def backbone(step: int) -> float:
        start = plan.freeze_epochs * spe
        if plan.frozen_for_good or step < start:
            return 0.0
        return plan.backbone_lr_mult * warm(step - start) * schedule_factor(step / spe, epochs, scheduler)

    return head, backbone


def split_parameters(model: nn.Module, backbone: set[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head, backbone) parameters of ``model``, the backbone's named in ``backbone``."""
    head, body = [], []
    for name, param in model.named_parameters():
        (body if name in backbone else head).append(param)
    return head, body


def backbone_norms(model: nn.Module, backbone: set[str]) -> list[nn.Module]:
    """The normalisation layers whose weights belong to the backbone (their statistics freeze with it)."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return [m for name, m in model.named_modules() if isinstance(m, norms) and f"{name}.weight" in backbone]


def freeze_for_good(model: nn.Module, backbone: set[str]) -> None:
    """``freeze_backbone``: the backbone's parameters need no gradients."""
    for name, param in model.named_parameters():
        if name in backbone:
            param.requires_grad_(False)


def set_norms_frozen(norms: list[nn.Module], frozen: bool) -> None:
    for module in norms:
        module.train(not frozen)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

