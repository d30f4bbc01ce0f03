"""Reading image files and turning them into model input.

One function, :func:`to_model_input`, prepares every image the same way for training,
evaluation and prediction, so preprocessing can never disagree between them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from meddiag.data.dicom import DicomIdentity, DicomImage, is_dicom_file, read_dicom, require_finite, unit_to_uint8
from meddiag.data.volumes import is_nifti_file
from meddiag.errors import ImageReadError, WrongKindError, reads_one_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
Fit = Literal["pad", "stretch"]

# Pillow's own guards are left as the process has them (importing meddiag changes no global setting): a
# truncated file fails (ImageFile.LOAD_TRUNCATED_IMAGES is off by default) and a decompression bomb is
# refused (DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS, about 179 million pixels by default).


def is_image_file(path: Path) -> bool:
    """Whether meddiag reads ``path`` as an image: a known extension (case-insensitive), or
    no extension and a DICOM marker (DICOM exports often have no extension)."""
    if path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    return suffix in IMAGE_EXTENSIONS or (suffix == "" and is_dicom_file(path))


@reads_one_file
def read_image(path: str | Path, window: str | tuple[float, float] | None = None) -> np.ndarray:
    """Read a 2D image file: PNG, JPEG, BMP, TIFF or DICOM.

    Returns a uint8 array of shape (H, W) for grayscale (also for RGB files whose three
    channels are equal, as most exported X-rays are) or (H, W, 3) for colour. PNG/TIFF
    images of more than 8 bits are scaled to 0-255 by their own minimum and maximum;
    DICOM goes through its Modality LUT and VOI window (``window``: a preset name,
    ``"C,W"``, or None for the file's own; see :mod:`meddiag.data.dicom`).

    Raises :class:`ImageReadError` naming the file for a missing, truncated or
    undecodable file, a volume (NIfTI), or an image with NaN or infinite values; whatever a
    decoder raises becomes that error (see :func:`~meddiag.errors.reads_one_file`).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "the file is empty")
    if is_dicom_file(path):
        return dicom_as_2d(read_dicom(path, window), path)
    if is_nifti_file(path):
        raise WrongKindError(path, "a NIfTI file (by its name), so a volume; this model reads 2D images")
    try:
        with Image.open(path) as img:
            img.load()
            arr = _to_uint8(img, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image format meddiag can decode") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"refused: too many pixels ({exc})") from None
    if arr.size == 0:
        raise ImageReadError(path, "image has no pixels")
    return arr


@reads_one_file
def read_image_file(path: str | Path, window: str | tuple[float, float] | None = None) -> tuple[np.ndarray, DicomIdentity | None]:
    """:func:`read_image`, plus the DICOM file's non-identifying identity (UIDs, patient key), or None."""
    path = Path(path)
    if is_dicom_file(path):
        image = read_dicom(path, window)
        return dicom_as_2d(image, path), image.identity
    return read_image(path, window), None


def dicom_as_2d(image: DicomImage, path: str | Path) -> np.ndarray:
    """A DICOM image from :func:`read_dicom` as :func:`read_image` returns it (uint8, 2D)."""
    if image.frames > 1:
        raise WrongKindError(path, f"a multi-frame DICOM ({image.frames} frames) is a volume; this model reads 2D images")
    if image.is_colour:
        return _gray_if_equal(image.pixels)
    return unit_to_uint8(image.pixels)


def _gray_if_equal(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) when the three channels are equal, else unchanged."""
    if (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all():
        return np.ascontiguousarray(arr[..., 0])
    return arr


def _to_uint8(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = require_finite(np.asarray(img, dtype=np.float64), path, "in the image")
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return np.round(scaled).astype(np.uint8)
    if img.mode in ("L", "1"):
        return np.asarray(img.convert("L"))
    # Palette, RGB(A), CMYK, YCbCr...: to RGB, then gray if the three channels are equal.
    return _gray_if_equal(np.asarray(img.convert("RGB")))


def is_colour(arr: np.ndarray) -> bool:
    """Whether an array from :func:`read_image` has three colour channels."""
    return arr.ndim == 3


def to_model_input(arr: np.ndarray, image_size: int, channels: int, fit: Fit = "pad") -> np.ndarray:
    """Resize an image from :func:`read_image` to the model's input.

    ``fit="pad"`` keeps the aspect ratio and pads the short side with black (so anatomy
    keeps its proportions); ``"stretch"`` resizes to a square regardless. Colour images
    become luminance for 1-channel models; grayscale is repeated for 3-channel models.

    Returns uint8 of shape (channels, image_size, image_size).
    """
    if channels == 1 and arr.ndim == 3:
        img = Image.fromarray(arr, "RGB").convert("L")
    else:
        img = Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB")
    w, h = img.size
    if fit == "stretch" or w == h:
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    else:
        scale = image_size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        img = Image.new(img.mode, (image_size, image_size))
        img.paste(resized, ((image_size - nw) // 2, (image_size - nh) // 2))
    out = np.asarray(img)
    if out.ndim == 2:
        out = out[None]
        if channels == 3:
            out = np.repeat(out, 3, axis=0)
    else:
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(out)
