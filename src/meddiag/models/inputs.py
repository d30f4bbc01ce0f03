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
