"""The model registry: ``create_model(name, in_channels, num_classes, ...)``.

Adding an architecture is one decorated builder function. Each entry also names the
layer that explanation methods (Grad-CAM) should look at, so no user ever has to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from meddiag.errors import ModelError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    spatial_dims: tuple[int, ...]
    target_layer: str
    description: str
    pooled_head: bool = True  # ends in global average pooling (Grad-CAM's assumption); False: flatten -> dense
    head: str = ""  # the final linear layer (logits); late fusion feeds the features before it, with the covariates', to a new one


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, spatial_dims: tuple[int, ...] = (2,), target_layer: str, description: str,
                   pooled_head: bool = True, head: str = "") -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(in_channels, num_classes, spatial_dims, image_size, **kwargs)``."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, spatial_dims, target_layer, description, pooled_head, head)
        return builder

    return wrap


def list_models() -> list[ModelEntry]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model '{name}'; available: {', '.join(sorted(_REGISTRY))}") from None


def create_model(
    name: str, in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224, **kwargs: object
) -> nn.Module:
    """Build a registered network that maps (N, in_channels, *spatial) to (N, num_classes) logits.

    ``image_size`` lets a network adapt to its input: small images (<= 64 px) get a
    CIFAR-style stem, and ``seed_cnn`` sizes its dense layer from it.
    """
    entry = get_entry(name)
    if spatial_dims not in entry.spatial_dims:
        raise ModelError(f"model '{name}' supports {' and '.join(f'{d}D' for d in entry.spatial_dims)} input, not {spatial_dims}D")
    if num_classes < 1 or in_channels < 1:
        raise ModelError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ModelError(f"model '{name}' has no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(options) or 'none'}")
    return entry.builder(in_channels=in_channels, num_classes=num_classes, spatial_dims=spatial_dims, image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_options(name: str) -> dict[str, object]:
    """The keyword options a registered model takes beyond the common ones, with their defaults
    (e.g. ``seed_cnn``: widths, dense)."""
    import inspect

    common = {"in_channels", "num_classes", "spatial_dims", "image_size"}
    params = inspect.signature(get_entry(name).builder).parameters
    return {k: p.default for k, p in params.items() if k not in common and p.kind is p.POSITIONAL_OR_KEYWORD}
