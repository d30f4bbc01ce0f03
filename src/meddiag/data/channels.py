"""Making a batch's channel count match what a model expects."""

from __future__ import annotations

import numpy as np
import torch

from meddiag.errors import DataError

# ITU-R BT.601 luma, as PIL's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, *spatial) -> (N, channels, *spatial): gray repeated, or colour to luminance. Images kept
    on disk (:class:`~meddiag.data.cache.DiskImages`) stay there, converted as they are read."""
    from meddiag.data.cache import DiskImages

    have = images.shape[1]
    if have == channels:
        return images
    if isinstance(images, DiskImages) and channels in (1, 3):
        return images.with_channels(channels)
    if have == 1 and channels == 3:
        return images.expand(-1, 3, *images.shape[2:]).contiguous()
    if have == 3 and channels == 1:
        weights = _LUMA.view(1, 3, *([1] * (images.ndim - 2)))
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"images have {have} channels but the model expects {channels}")


def luminance(image: np.ndarray) -> np.ndarray:
    """uint8 (3, *spatial) -> (1, *spatial), the weights :func:`match_channels` uses."""
    weights = _LUMA.numpy().reshape(3, *([1] * (image.ndim - 1)))
    return np.clip(np.round((image.astype(np.float32) * weights).sum(0, keepdims=True)), 0, 255).astype(np.uint8)
