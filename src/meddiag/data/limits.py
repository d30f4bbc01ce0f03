"""How many pixels a file says it holds, read from its header alone, so that an image whose
decoded size would exhaust memory (a "decompression bomb": a few kilobytes of PNG, gzip'd NIfTI
or compressed DICOM declaring billions of pixels) is refused before anything is decoded."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from meddiag.data.dicom import declared_frames, is_dicom_file, read_dicom_dataset
from meddiag.data.volumes import is_nifti_file
from meddiag.errors import ImageReadError, reads_one_file


@reads_one_file(quote=False)
def declared_pixels(path: str | Path) -> int:
    """Pixels (voxels; frames times rows times columns for multi-frame DICOM) the file declares.
    Raises :class:`ImageReadError` when the header cannot be read."""
    path = Path(path)
    if is_dicom_file(path):
        ds = read_dicom_dataset(path, stop_before_pixels=True)
        frames = declared_frames(ds, path)
        return int(getattr(ds, "Rows", 0) or 0) * int(getattr(ds, "Columns", 0) or 0) * frames
    if is_nifti_file(path):
        import nibabel as nib

        try:
            shape = nib.load(str(path)).header.get_data_shape()
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad headers
            raise ImageReadError(path, f"not a readable NIfTI header ({exc.__class__.__name__})") from None
        return math.prod(int(s) for s in shape)
    try:
        with Image.open(path) as img:  # lazy: reads the header, decodes nothing
            width, height = img.size
            return width * height * max(1, getattr(img, "n_frames", 1))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageReadError(path, "not an image format meddiag can decode") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"refused: too many pixels ({exc})") from None


def check_pixels(path: str | Path, max_pixels: int) -> None:
    """:class:`ImageReadError` when ``path`` declares more than ``max_pixels`` pixels."""
    n = declared_pixels(path)
    if n > max_pixels:
        raise ImageReadError(path, f"refused: the file declares {n:,} pixels, more than the limit of {max_pixels:,} "
                                   "(raise the limit if the image is genuine)")
