"""Deep ensembles (Lakshminarayanan et al. 2017): several trained networks, one averaged prediction.

An ensemble is a model like any other: its checkpoint holds every member's weights and model card,
and its output is the log of the members' mean probability (the logit of it, multi-label), so
softmax (sigmoid) of the output is exactly that mean.
"""

from __future__ import annotations

import torch
from torch import nn

from meddiag.errors import ModelError
from meddiag.models.fusion import call, takes_covariates
from meddiag.models.inference import logits_to_probs
from meddiag.models.registry import register_model

# Members must agree on these to be averaged (same classes, same input, same preparation).
MUST_AGREE = ("class_names", "task", "image_size", "in_channels", "spatial_dims", "mean", "std", "fit", "window", "volume_index",
              "covariates")


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], task: str, temperatures: list[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.task = task
        self.temperatures = temperatures
        self.takes_covariates = any(takes_covariates(m) for m in members)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        probs = torch.stack([logits_to_probs(call(m, x, covariates).float(), self.task, t)
                             for m, t in zip(self.members, self.temperatures)]).mean(0)
        probs = probs.clamp(1e-7, 1 - 1e-7)
        return torch.log(probs / (1 - probs)) if self.task == "multilabel" else torch.log(probs)


@register_model("ensemble", spatial_dims=(2, 3), target_layer="", description="the averaged probabilities of trained runs; made by 'meddiag ensemble RUN RUN ... --out DIR', not by train")
def ensemble(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224,
             members: list[dict] | None = None) -> nn.Module:
    from meddiag.models.checkpoint import ModelCard

    cards = [ModelCard.model_validate(m) for m in members or []]
    if len(cards) < 2:
        raise ModelError("an ensemble needs at least two member models")
    return Ensemble([c.build_model() for c in cards], cards[0].task, [c.temperature for c in cards])


def check_members(cards: list) -> None:  # noqa: ANN001 - ModelCards
    """Refuse members that cannot be averaged, naming the first disagreement."""
    for key in MUST_AGREE:
        values = [getattr(c, key) for c in cards]
        if any(v != values[0] for v in values[1:]):
            raise ModelError(f"ensemble members disagree on {key}: {values}")
