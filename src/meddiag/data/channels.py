"""Making a batch's channel count match what a model expects."""

from __future__ import annotations

import torch

from meddiag.errors import DataError

# ITU-R BT.601 luma, as PIL's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, *spatial) -> (N, channels, *spatial): gray repeated, or colour to luminance."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, *images.shape[2:]).contiguous()
    if have == 3 and channels == 1:
        weights = _LUMA.view(1, 3, *([1] * (images.ndim - 2)))
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"images have {have} channels but the model expects {channels}")
