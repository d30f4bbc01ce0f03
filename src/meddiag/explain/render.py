"""Heatmap figures: the original image beside its overlay, or three planes of a volume."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib import colormaps
from PIL import Image

from meddiag.evaluation.plots import save_figure, subplots


def map_to_original(heat: np.ndarray, height: int, width: int, fit: str = "pad") -> np.ndarray:
    """A square model-frame map (S, S) back onto the original image's (height, width) pixels:
    undo :func:`meddiag.data.images.to_model_input` (crop the padding, then resize)."""
    s = heat.shape[0]
    if fit != "stretch" and height != width:
        scale = s / max(width, height)
        nw, nh = max(1, round(width * scale)), max(1, round(height * scale))
        top, left = (s - nh) // 2, (s - nw) // 2
        heat = heat[top : top + nh, left : left + nw]
    resized = Image.fromarray(heat.astype(np.float32), "F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0, 1)


def overlay_image(original: np.ndarray, heat: np.ndarray, fit: str = "pad", alpha: float = 0.45,
                  max_side: int | None = None) -> np.ndarray:
    """RGB uint8: the heatmap (colour map 'jet') blended over the original image, at the original's
    resolution, or scaled down so that its longer side is at most ``max_side``."""
    image = Image.fromarray(original)
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    full = map_to_original(heat, base.shape[0], base.shape[1], fit)
    colour = colormaps["jet"](full)[..., :3]
    return np.round(((1 - alpha) * base + alpha * colour) * 255).astype(np.uint8)


def overlay_figure(original: np.ndarray, heat: np.ndarray, caption: str, path: Path, fit: str = "pad",
                   alpha: float = 0.45) -> Path:
    """PNG: the original (its own resolution; DICOM as windowed) beside the heatmap over it."""
    h, w = original.shape[:2]
    aspect = w / h
    fig, axes = subplots(1, 2, figsize=(2 * 4 * min(aspect, 2), 4.6), dpi=110)
    cmap = "gray" if original.ndim == 2 else None
    axes[0].imshow(original, cmap=cmap, vmin=0, vmax=255)
    axes[1].imshow(overlay_image(original, heat, fit, alpha))
    for ax in axes:
        ax.axis("off")
    axes[0].set_title("image", fontsize=9)
    axes[1].set_title("where the model looked", fontsize=9)
    fig.suptitle(caption, fontsize=10)
    return save_figure(fig, path)


def volume_figure(volume: np.ndarray, heat: np.ndarray, caption: str, path: Path | BinaryIO, alpha: float = 0.45) -> Path | BinaryIO:
    """PNG: the three planes through the map's peak, each with the heatmap over it.
    ``volume`` and ``heat`` are (X, Y, Z) arrays in the model's frame (RAS+, voxels of equal size)."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    planes = [("sagittal", np.s_[peak[0], :, :]), ("coronal", np.s_[:, peak[1], :]), ("axial", np.s_[:, :, peak[2]])]
    fig, axes = subplots(1, 3, figsize=(11, 4.2), dpi=110)
    for ax, (name, index) in zip(axes, planes):
        # Show with the superior (or anterior) direction up: transpose, then flip rows.
        ax.imshow(np.flipud(volume[index].T), cmap="gray", vmin=0, vmax=255)
        ax.imshow(np.flipud(heat[index].T), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(f"{name} through the peak", fontsize=9)
        ax.axis("off")
    fig.suptitle(caption, fontsize=10)
    return save_figure(fig, path)
