"""Reading a file into exactly the input a trained model expects, as its card describes.

One reader for prediction, explanation and serving: a 2D image file gives one input (and the
image as read, for drawing heatmaps over it); for 3D models a NIfTI file, a multi-frame DICOM
file or a folder holding a DICOM series gives one input per volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiag.data.images import read_image_file, to_model_input
from meddiag.data.limits import check_pixels
from meddiag.data.volumes import read_volumes, volume_to_model_input
from meddiag.errors import reads_one_file
from meddiag.models.checkpoint import ModelCard
from meddiag.models.ood import input_problems


@dataclass
class ModelInput:
    source: str
    array: np.ndarray  # uint8 (C, S, S) or (C, S, S, S)
    original: np.ndarray | None = None  # the 2D image as read (DICOM windowed), for overlays; None for volumes
    sop_instance_uid: str = ""  # DICOM: the object diagnosed (an object id, not PHI)
    series_instance_uid: str = ""
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files left out of a series
    covariates: tuple[np.ndarray, list[str]] | None = None  # models with covariates: (F,) encoded, and the names missing
    problems: list[str] = field(default_factory=list)  # the input contract checks it failed (see meddiag.models.ood)
    modality: str = ""  # DICOM: Modality and BodyPartExamined (upper case; "" when not DICOM or absent)
    body_part: str = ""

    def check(self, card: ModelCard) -> list[str]:
        """The input contract checks of :func:`meddiag.models.ood.input_problems`, kept in ``problems``."""
        self.problems = input_problems(self.array, self.original, card, self.modality, self.body_part)
        return self.problems


@reads_one_file
def read_inputs(path: str | Path, card: ModelCard, max_pixels: int | None = None) -> list[ModelInput]:
    """The model inputs in ``path`` for the model of ``card``. ``max_pixels``: refuse (before
    decoding) a file whose header declares more pixels or voxels than this.

    Raises :class:`~meddiag.errors.ImageReadError` (or ``DataError``) naming the file."""
    path = Path(path)
    if max_pixels is not None and path.is_file():
        check_pixels(path, max_pixels)
    if card.spatial_dims == 3:
        volumes = read_volumes(path, card.volume_index)
        excluded = volumes[0].excluded if volumes else []
        return [ModelInput(str(path), volume_to_model_input(v, card.image_size, card.in_channels, card.window, card.fit),
                           None, v.sop_instance_uid, v.series_instance_uid, excluded, modality=v.modality.strip().upper(),
                           body_part=v.body_part) for v in volumes]
    arr, identity = read_image_file(path, card.window)
    item = ModelInput(str(path), to_model_input(arr, card.image_size, card.in_channels, card.fit), arr)
    if identity is not None:
        item.sop_instance_uid, item.series_instance_uid = identity.sop_instance_uid, identity.series_instance_uid
        item.modality, item.body_part = identity.modality, identity.body_part
    return [item]


def array_inputs(images: object, card: ModelCard, name: str = "array") -> list[ModelInput]:
    """Images held in memory as the model's inputs: a numpy array, a torch tensor, a PIL image, or a list of them.

    A 2D model takes an image (H, W) or (H, W, 3), a batch (N, H, W) or (N, H, W, 3), a PIL image, or a list
    of these; a 3D model a volume (D, H, W) or a batch (N, D, H, W) (voxels of 1 mm assumed). Values: uint8
    as they are; floats within [0, 1] as unit intensities; anything else (16-bit, Hounsfield units) scaled by
    its own minimum and maximum, as 16-bit PNG files are. Inputs are named ``name[i]``. :class:`DataError`
    (naming the input) for a shape the model cannot take, or NaN and infinite values."""
    from meddiag.data.dicom import unit_to_uint8
    from meddiag.data.volumes import Volume
    from meddiag.errors import DataError

    items = _as_arrays(images, card.spatial_dims)
    out = []
    for i, arr in enumerate(items):
        label = f"{name}[{i}]"
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{label}: the image holds NaN or infinite values")
        if card.spatial_dims == 3:
            if arr.ndim != 3:
                raise DataError(f"{label}: a 3D model takes volumes (D, H, W), not an array of shape {arr.shape}")
            volume = Volume(array=arr.astype(np.float32), affine=np.eye(4))
            out.append(ModelInput(label, volume_to_model_input(volume, card.image_size, card.in_channels, card.window, card.fit)))
            continue
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or min(arr.shape[:2]) < 1:
            raise DataError(f"{label}: a 2D model takes images (H, W) or (H, W, 3), not an array of shape {arr.shape}")
        if arr.dtype != np.uint8:
            unit = arr.astype(np.float64)
            if not (unit.min() >= 0 and unit.max() <= 1):
                lo, hi = float(unit.min()), float(unit.max())
                unit = (unit - lo) / (hi - lo) if hi > lo else np.zeros_like(unit)
            arr = unit_to_uint8(unit)
        out.append(ModelInput(label, to_model_input(arr, card.image_size, card.in_channels, card.fit), arr))
    return out


def _as_arrays(images: object, spatial_dims: int) -> list[np.ndarray]:
    """``images`` (see :func:`array_inputs`) as a list of single images or volumes."""
    from meddiag.errors import DataError

    if isinstance(images, (list, tuple)):
        return [a for item in images for a in _as_arrays(item, spatial_dims)]
    if hasattr(images, "getbands"):  # a PIL image
        mode = "L" if len(images.getbands()) == 1 else "RGB"  # type: ignore[attr-defined]
        return [np.asarray(images.convert(mode))]  # type: ignore[attr-defined]
    if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor
        images = images.detach().cpu().numpy()  # type: ignore[attr-defined]
    if not isinstance(images, np.ndarray):
        raise DataError(f"cannot read a {type(images).__name__} as an image: give file paths, numpy arrays, PIL images or tensors")
    arr = images
    single = 3 if spatial_dims == 3 else 2
    if arr.ndim == single or (spatial_dims == 2 and arr.ndim == 3 and arr.shape[-1] == 3):
        return [arr]
    if arr.ndim == single + 1 or (spatial_dims == 2 and arr.ndim == 4 and arr.shape[-1] == 3):
        return list(arr)
    kind = "images (H, W) or (H, W, 3), or a batch of them" if spatial_dims == 2 else "volumes (D, H, W), or a batch (N, D, H, W)"
    raise DataError(f"an array of shape {arr.shape}: this model takes {kind}")
