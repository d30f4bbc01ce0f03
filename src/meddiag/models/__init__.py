"""Stage 2: the model registry, the networks, checkpoints and inference."""

from meddiag.models import ensemble, fusion, monai_nets, seed_cnn  # noqa: F401 - registers the models
from meddiag.models.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from meddiag.models.inference import logits_to_probs, predict_proba
from meddiag.models.registry import count_parameters, create_model, get_entry, list_models, register_model

__all__ = [
    "ModelCard", "load_checkpoint", "save_checkpoint", "logits_to_probs", "predict_proba",
    "count_parameters", "create_model", "get_entry", "list_models", "register_model",
]
