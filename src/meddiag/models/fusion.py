"""Image + patient data in one network: late fusion, FiLM, and the covariates-only network.

Every fused network is ``forward(images, covariates=None) -> logits`` where ``covariates`` is the
(N, F) float32 encoding of :class:`~meddiag.data.covariates.CovariateSchema`. ``None`` means no
patient data at all: the network uses the schema's all-missing encoding (kept as a buffer), the same
input that covariate dropout trains it on, so calling it with the image alone (Grad-CAM, ONNX with
one input, old callers) is a defined, trained case.

- ``late`` (default): the CNN's pooled features (the input of its final linear layer) concatenated
  with a small tabular encoder's output, then a new linear head.
- ``film``: the tabular encoder scales and shifts the channels of the CNN's last convolutional block
  (Perez et al. 2018; as DAFT, Wolf et al. 2022, conditions a ResNet's last block); the CNN's own head
  gives the logits. The modulation starts as the identity (scale 1, shift 0).
- ``tabular`` (a registered model): covariates only, a small network; the image is ignored.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from meddiag.data.covariates import CovariateSchema, CovariateTable
from meddiag.errors import ModelError
from meddiag.models.registry import ModelEntry, get_entry, register_model

Fusion = Literal["late", "film"]
FUSIONS = ("late", "film")
HIDDEN = 64


class CovariateEncoder(nn.Module):
    """(N, F) encoded covariates -> (N, hidden) features: two linear layers with ReLU, dropout between."""

    def __init__(self, n_features: int, hidden: int = HIDDEN, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.net(c)


class NoImage(nn.Module):
    """The image branch of the covariates-only model: (N, ...) -> (N, 0) features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros((x.shape[0], 0))


@register_model("tabular", spatial_dims=(2, 3), target_layer="", head="",
                description="covariates only: a small network on the patient data (needs --covariates or --tabular); the baseline the fused models are compared with")
def tabular(in_channels: int, num_classes: int, spatial_dims: int = 2, image_size: int = 224) -> nn.Module:
    return NoImage()


class FiLM(nn.Module):
    """Wraps a block: its output's channels are scaled by (1 + gamma) and shifted by beta, both from
    ``condition`` (N, hidden), set by :class:`FusedNet` for the duration of one forward pass."""

    def __init__(self, block: nn.Module, hidden: int, channels: int) -> None:
        super().__init__()
        self.block = block
        self.film = nn.Linear(hidden, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.condition: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.condition is None:
            return out
        gamma, beta = self.film(self.condition).chunk(2, dim=1)
        shape = (out.shape[0], out.shape[1]) + (1,) * (out.ndim - 2)
        return out * (1 + gamma.reshape(shape)) + beta.reshape(shape)


class FusedNet(nn.Module):
    """``forward(x, covariates=None)``: logits from the image ``x`` and the encoded ``covariates``."""

    def __init__(self, net: nn.Module, entry: ModelEntry, missing_row: np.ndarray, num_classes: int, fusion: Fusion,
                 probe: torch.Tensor, hidden: int = HIDDEN) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ModelError(f"unknown fusion '{fusion}'; choose {' or '.join(FUSIONS)}")
        self.fusion = fusion
        self.register_buffer("missing_row", torch.as_tensor(np.asarray(missing_row, dtype=np.float32)))
        self.encoder = CovariateEncoder(len(missing_row), hidden)
        if isinstance(net, NoImage) or fusion == "late":
            width = 0
            if not isinstance(net, NoImage):
                if not entry.head:
                    raise ModelError(f"model '{entry.name}' names no final linear layer, so it cannot be fused")
                last = net.get_submodule(entry.head)
                width = last.in_features
                net.set_submodule(entry.head, nn.Identity())
            self.image = net
            self.head: nn.Module | None = nn.Linear(width + hidden, num_classes)
            self.film_block: FiLM | None = None
        else:
            if not entry.target_layer:
                raise ModelError(f"model '{entry.name}' names no convolutional block to modulate, so FiLM cannot fuse it")
            channels = _channels_at(net, entry.target_layer, probe)
            self.film_block = FiLM(net.get_submodule(entry.target_layer), hidden, channels)
            net.set_submodule(entry.target_layer, self.film_block)
            self.image, self.head = net, None

    @property
    def uses_image(self) -> bool:
        return not isinstance(self.image, NoImage)

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        c = self.missing_row.expand(x.shape[0], -1) if covariates is None else covariates.to(self.missing_row.dtype)
        h = self.encoder(c)
        if self.head is not None:
            return self.head(torch.cat([self.image(x).flatten(1).to(h.dtype), h], dim=1))
        assert self.film_block is not None
        self.film_block.condition = h
        try:
            return self.image(x)
        finally:
            self.film_block.condition = None


def _channels_at(net: nn.Module, layer: str, probe: torch.Tensor) -> int:
    """The number of channels ``layer`` outputs, found by running ``probe`` (one input) through ``net``."""
    seen: list[int] = []
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(int(o.shape[1])))
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(probe)
    finally:
        handle.remove()
        net.train(was_training)
    return seen[0]


def fuse(net: nn.Module, model_name: str, missing_row: np.ndarray, num_classes: int, fusion: Fusion,
         in_channels: int, spatial_dims: int, image_size: int) -> FusedNet:
    """``net`` (a registered network) joined with a covariate encoder as ``fusion`` says."""
    entry = get_entry(model_name)
    probe = torch.zeros((1, in_channels) + (image_size,) * spatial_dims)
    return FusedNet(net, entry, missing_row, num_classes, fusion, probe)


def image_part(model: nn.Module) -> tuple[nn.Module, str]:
    """The image network inside ``model`` and the prefix of its layer names ('' when not fused)."""
    return (model.image, "image.") if isinstance(model, FusedNet) else (model, "")


class WithCovariates(nn.Module):
    """``model`` with fixed covariates (N, F), as a one-input network ``forward(x)`` (for Grad-CAM and
    other tools that call a network with the image alone)."""

    def __init__(self, model: nn.Module, covariates: torch.Tensor | None) -> None:
        super().__init__()
        self.model, self.covariates = model, covariates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.covariates)


def call(model: nn.Module, x: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
    """``model``'s logits for ``x`` with ``covariates`` when it takes them (None: a plain network, or no patient data)."""
    return model(x, covariates) if covariates is not None and takes_covariates(model) else model(x)


def covariate_tensor(schema: CovariateSchema | None, table: CovariateTable | None, warn: str | None = None) -> torch.Tensor | None:
    """(N, F) float32: ``table`` encoded by ``schema`` (None without either: the model sees no patient data)."""
    if schema is None or table is None:
        return None
    return torch.from_numpy(schema.encode(table, warn))


def takes_covariates(model: nn.Module) -> bool:
    return isinstance(model, FusedNet) or bool(getattr(model, "takes_covariates", False))


def withhold(covariates: torch.Tensor, missing_row: torch.Tensor, blocks: list[torch.Tensor], drop: torch.Tensor) -> torch.Tensor:
    """``covariates`` (N, F) with block b of case i replaced by the all-missing encoding where ``drop[i, b]``."""
    mask = torch.zeros_like(covariates, dtype=torch.bool)
    for b, index in enumerate(blocks):
        mask[:, index.to(covariates.device)] = drop[:, b : b + 1].to(covariates.device)
    return torch.where(mask, missing_row.to(covariates.dtype), covariates)


def withhold_at_random(covariates: torch.Tensor, missing_row: torch.Tensor, blocks: list[torch.Tensor], p: float) -> torch.Tensor:
    """Covariate dropout: each case loses all its covariates with probability ``p``, and otherwise each
    block with probability ``p``; what is lost reads exactly as missing data does at prediction time."""
    n = covariates.shape[0]
    everything = torch.rand(n, 1) < p
    drop = everything | (torch.rand(n, len(blocks)) < p)
    return withhold(covariates, missing_row, blocks, drop)
