"""Self-sufficient checkpoints: the weights plus everything needed to use them.

A checkpoint is a Lightning checkpoint (so training can resume from it) with one more
entry, ``"meddiag"``: the :class:`ModelCard` metadata. Predicting needs nothing else:
not the training data, not the config. Loading uses ``torch.load(weights_only=True)``,
which accepts only tensors and plain containers, never arbitrary pickled objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import meddiag
from meddiag.data.covariates import CovariateSchema
from meddiag.errors import ModelError
from meddiag.models.registry import create_model

META_KEY = "meddiag"
STATE_PREFIX = "model."
OOD_PREFIX = "ood."  # the out-of-distribution reference's tensors (see meddiag.models.ood)


class OODRule(BaseModel):
    """How the model flags inputs unlike its training data (see :mod:`meddiag.models.ood`)."""

    model_config = ConfigDict(extra="ignore")
    method: str = Field(description="the score flagged: mahalanobis, knn, energy, msp, pixels or combined")
    threshold: float = Field(description="inputs scoring above it are flagged")
    keep: float = Field(description="the share of validation inputs the threshold keeps")
    val_flagged: float = Field(description="the share of validation inputs it flagged")
    thresholds: dict[str, float] = Field(default_factory=dict, description="each method's threshold for the same share")
    scales: dict[str, float] = Field(default_factory=dict, description="combined: the thresholds its scores are divided by")
    reference_images: int = 0
    validation_images: int = 0


class ModelCard(BaseModel):
    """What a trained model is and how its input must be prepared."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model_name: str
    model_kwargs: dict = Field(default_factory=dict)
    class_names: list[str]
    task: Literal["binary", "multiclass", "multilabel"]
    image_size: int
    in_channels: int
    spatial_dims: int = 2
    mean: float = 0.5
    std: float = 0.5
    fit: Literal["pad", "stretch"] = "pad"
    window: str | None = Field(None, description="DICOM VOI window used in training (None: each file's own)")
    volume_index: int | None = Field(None, description="4D NIfTI files: the volume used in training")
    threshold: float = Field(0.5, description="decision threshold on the positive class (binary) or each label (multi-label)")
    operating_point: str | None = Field(None, description="the rule that chose the threshold on validation (youden, sens90, ...); None: fixed")
    temperature: float = Field(1.0, gt=0, description="temperature scaling of the logits, fitted on validation (1: none)")
    tta: int = Field(0, ge=0, description="test-time augmentation: augmented copies averaged with each image")
    mc_dropout: int = Field(0, ge=0, description="MC-dropout passes averaged (networks with dropout)")
    coverage: float | None = Field(None, description="target share of cases answered; the rest are referred (abstain)")
    abstain_threshold: float | None = Field(None, description="abstain when the normalised predictive entropy exceeds this (chosen on validation)")
    positive_class: str | None = Field(None, description="two-class tasks: the finding, always class_names[1] (None in older checkpoints: class_names[1] too)")
    covariates: CovariateSchema | None = Field(None, description="the patient data the model takes beside the image, and how it is encoded (None: image only)")
    fusion: Literal["late", "film"] | None = Field(None, description="how image and covariates are joined (models with covariates)")
    ood: OODRule | None = Field(None, description="the out-of-distribution rule (None: made before there was one; `meddiag calibrate-ood RUN` adds it)")
    modalities: list[str] = Field(default_factory=list, description="DICOM modalities the model is for (its training files', or declared): DICOM inputs of another are flagged; empty: no check")
    body_parts: list[str] = Field(default_factory=list, description="DICOM BodyPartExamined values of its training files: a DICOM input stating another is flagged; empty: no check")
    init_weights: dict | None = Field(None, description="the initial weights it was trained from: source, sha256, tensors loaded/adapted/missing (None: from scratch)")
    data_name: str = ""
    meddiag_version: str = meddiag.__version__

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def build_model(self) -> nn.Module:
        net = create_model(self.model_name, self.in_channels, self.num_classes, self.spatial_dims, self.image_size, **self.model_kwargs)
        if self.covariates is None or self.model_name == "ensemble":
            if self.model_name == "tabular":
                raise ModelError("the tabular model needs covariates: give --covariates (manifest columns) or --tabular")
            return net
        from meddiag.models.fusion import fuse

        return fuse(net, self.model_name, self.covariates.missing_row(), self.num_classes, self.fusion or "late",
                    self.in_channels, self.spatial_dims, self.image_size)


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write a minimal checkpoint: the weights and the model card."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {STATE_PREFIX + k: v for k, v in model.state_dict().items()}
    _save_atomic({"state_dict": state, META_KEY: card.model_dump()}, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """Load a checkpoint written by training or :func:`save_checkpoint`.

    Returns the model in eval mode and its card. Raises :class:`ModelError` naming the
    file when it is missing, not a meddiag checkpoint, or holds anything but tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not safe or not ours
        raise ModelError(f"cannot load checkpoint {path}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "state_dict" not in ckpt:
        raise ModelError(f"{path} is not a meddiag checkpoint (it has no model card)")
    card = ModelCard.model_validate(ckpt[META_KEY])
    model = card.build_model()
    state = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not fit model {card.model_name}: {str(exc).splitlines()[0]}") from None
    return model.eval(), card


def slim_checkpoint(path: str | Path) -> Path:
    """Rewrite a training checkpoint in place (atomically) with only what predicting needs: the
    model's weights and its card (dropping, e.g., the weights averaged away and the hyper-parameters)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    slim = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if k.startswith((STATE_PREFIX, OOD_PREFIX))},
            META_KEY: ckpt[META_KEY]}
    _save_atomic(slim, path)
    return path


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def save_ood_reference(path: str | Path, reference: object, rule: OODRule, shift: object = None) -> ModelCard:
    """Store the OOD feature reference and the shift reference (their tensors under ``ood.*`` in the state
    dict, never loaded into the network; None: none) and the rule in the card of checkpoint ``path``, in place."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(OOD_PREFIX)}
    for part in (reference, shift):
        if part is not None:
            state.update(part.state())  # type: ignore[attr-defined]
    ckpt["state_dict"] = state
    card = ModelCard.model_validate({**ckpt[META_KEY], "ood": rule.model_dump()})
    ckpt[META_KEY] = card.model_dump()
    _save_atomic(ckpt, path)
    return card


def load_ood_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``ood.*`` tensors of a checkpoint (empty when it has none)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(OOD_PREFIX)}


def update_card(path: str | Path, **changes: object) -> ModelCard:
    """Change fields of a checkpoint's model card in place (e.g. the threshold chosen on
    validation, a fitted temperature); the weights are untouched. Returns the new card."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    card = ModelCard.model_validate({**ckpt[META_KEY], **changes})
    ckpt[META_KEY] = card.model_dump()
    _save_atomic(ckpt, path)
    return card
