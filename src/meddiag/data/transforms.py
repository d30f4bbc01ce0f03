"""Batch-level transforms on tensors: augmentation and normalisation, 2D and 3D alike.

Augmenting a whole batch at once (one affine grid, one ``grid_sample``) runs on
whatever device the batch is on and costs far less than per-image transforms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Random augmentation suited to medical images; all ranges are symmetric.

    Horizontal flip is off by default: anatomy is not left-right symmetric.
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    rotation: float = Field(10.0, ge=0, le=180, description="max rotation, degrees")
    scale: float = Field(0.1, ge=0, lt=1, description="max relative zoom in or out")
    translate: float = Field(0.1, ge=0, lt=1, description="max shift, fraction of the image size")
    brightness: float = Field(0.1, ge=0, lt=1, description="max additive change, on [0, 1] intensities")
    contrast: float = Field(0.1, ge=0, lt=1, description="max relative contrast change")
    hflip: bool = False


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, *spatial) -> float32 in [0, 1]."""
    return images.float().div_(255.0)


def normalize(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / std, the intensity normalisation stored in every checkpoint."""
    return (x - mean) / std


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly transform a float batch (N, C, H, W) or (N, C, D, H, W) in [0, 1].

    Each image gets its own rotation (in-plane, about the last two axes), zoom, shift,
    optional horizontal flip, brightness and contrast. Output stays in [0, 1].
    """
    if not cfg.enabled:
        return x
    n, dims = x.shape[0], x.ndim - 2
    dev = x.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device="cpu").to(dev) * 2 - 1

    theta = torch.eye(dims, dims + 1, device=dev).repeat(n, 1, 1)
    angle = uniform(n) * math.radians(cfg.rotation)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.eye(dims, device=dev).repeat(n, 1, 1)
    # affine_grid's coordinates are (x, y[, z]) = (W, H[, D]): rotate in the (x, y) plane.
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, -sin, sin, cos
    zoom = 1.0 + uniform(n) * cfg.scale
    theta[:, :, :dims] = rot / zoom[:, None, None]
    if cfg.hflip:
        flip = torch.where(torch.rand(n, generator=generator).to(dev) < 0.5, -1.0, 1.0)
        theta[:, :, 0] *= flip[:, None]
    theta[:, :, dims] = uniform(n, dims) * cfg.translate * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    view = (n,) + (1,) * (x.ndim - 1)
    if cfg.contrast > 0:
        mean = out.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
        out = (out - mean) * (1 + uniform(n) * cfg.contrast).view(view) + mean
    if cfg.brightness > 0:
        out = out + (uniform(n) * cfg.brightness).view(view)
    return out.clamp_(0.0, 1.0)
