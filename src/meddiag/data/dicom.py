"""DICOM files and series: pixel data to displayable intensities, as a radiologist's viewer would.

Grayscale pipeline: stored values -> Modality LUT (RescaleSlope/Intercept: Hounsfield units for CT)
-> VOI (the file's WindowCenter/Width or VOI LUT by default; a named preset such as ``lung``; or an
explicit ``"C,W"``) -> MONOCHROME1 inverted so that high values are bright. Colour (RGB, YBR)
becomes RGB. Compressed transfer syntaxes decode through pydicom's pylibjpeg plugins.

Only non-identifying attributes are kept (modality, UIDs, geometry): patient names, ids, dates
and accession numbers never leave this module, and errors name the file by its path alone.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from meddiag.errors import ImageReadError, reads_one_file

# (center, width) in Hounsfield units, as commonly used in CT reading.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "soft_tissue": (50.0, 400.0),
}

# Storage classes that hold no image to classify (by SOP Class UID).
_NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation object (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.88.11": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.22": "a structured report",
    "1.2.840.10008.5.1.4.1.1.88.33": "a structured report",
    "1.2.840.10008.5.1.4.1.1.11.1": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.88.59": "a key object selection",
}


@dataclass(frozen=True)
class DicomIdentity:
    """What may be known of a file's provenance without any protected health information.

    patient_key: a one-way key (SHA-256 of the PatientID) that groups a patient's files for
    splitting; the PatientID itself is never kept. UIDs identify objects, not people.
    """

    patient_key: str | None
    sop_instance_uid: str
    series_instance_uid: str
    modality: str = ""  # Modality (CR, DX, CT, MR, ...), upper case
    body_part: str = ""  # BodyPartExamined (CHEST, KNEE, ...), upper case; often absent


def patient_key(patient_id: str) -> str:
    return hashlib.sha256(b"meddiag-patient:" + patient_id.encode()).hexdigest()[:16]


@dataclass
class DicomImage:
    """Pixels of one DICOM file and the non-identifying facts about them.

    pixels: float32 in [0, 1] after VOI, (H, W) or (frames, H, W); or uint8 RGB (H, W, 3).
    spacing: (row, column) pixel spacing in mm, when the file states it.
    """

    pixels: np.ndarray
    modality: str
    identity: DicomIdentity
    spacing: tuple[float, float] | None
    frames: int
    bits_stored: int = 0

    @property
    def is_colour(self) -> bool:
        return self.pixels.dtype == np.uint8 and self.pixels.ndim == 3 and self.pixels.shape[-1] == 3


def parse_window(window: str | tuple[float, float] | None) -> tuple[float, float] | None:
    """A preset name (``lung``, ``bone``, ...), ``"C,W"``, a (center, width) pair, or None (the file's own)."""
    if window is None or isinstance(window, tuple):
        return window
    text = window.strip().lower()
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"window must be one of {', '.join(WINDOW_PRESETS)} or 'CENTER,WIDTH', not '{window}'") from None
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return center, width


def is_dicom_file(path: Path) -> bool:
    """A .dcm/.dicom file, any file with the 'DICM' marker at byte 128 (DICOM Part 10), or a file
    without the 128-byte preamble that starts with a DICOM data element (older exports, PACS dumps)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as fh:
            return looks_like_dicom(fh.read(132))
    except OSError:
        return False


# Value representations, for recognising an explicit-VR data element at the start of a file.
_VRS = {vr.encode() for vr in "AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()}


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first bytes (132 of them, where it has that many) are DICOM: the Part 10
    'DICM' marker after the preamble, or, without a preamble, a first data element of the file meta
    group (0002) or the identifying group (0008) in little-endian explicit or implicit VR."""
    return head[128:132] == b"DICM" or _starts_with_element(head)


def _starts_with_element(head: bytes) -> bool:
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x00FF:
        return False
    return head[4:6] in _VRS or struct.unpack("<I", head[4:8])[0] < 0x10000


@lru_cache(maxsize=1)
def quiet_value_validation() -> None:
    """Stop pydicom's value-validation warnings on reading: they quote header values verbatim,
    so an odd PatientName or PatientBirthDate would reach the log. (Set through pydicom's own
    configuration; ``warnings.catch_warnings`` is not thread-safe and files are read in threads.)"""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


def read_dicom_dataset(path: Path, stop_before_pixels: bool = False):  # noqa: ANN201 - pydicom.Dataset
    """pydicom's dataset of ``path``; :class:`ImageReadError` naming the file if it is not DICOM or
    its header cannot be parsed (whatever pydicom raises). Files without the 128-byte preamble are
    read when they start with a DICOM data element; without file meta information their transfer
    syntax is the (uncompressed) encoding pydicom recognised."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    quiet_value_validation()
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be opened ({exc.strerror or exc.__class__.__name__})") from None
    if not head:
        raise ImageReadError(path, "the file is empty")
    part10 = head[128:132] == b"DICM"
    if not part10 and not _starts_with_element(head):
        raise ImageReadError(path, "not a DICOM file (no DICM marker and no valid header)")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=not part10)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises many types; never quote it (PHI)
        raise ImageReadError(path, f"corrupt or truncated DICOM ({exc.__class__.__name__})") from None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) if little else ExplicitVRBigEndian
    return ds


def declared_frames(ds, path: Path) -> int:  # noqa: ANN001
    """NumberOfFrames of a dataset read from ``path``, checked against the file's size: a header
    declaring more pixel data than the file could hold (a damaged or lying header) is
    :class:`ImageReadError`, so the file is excluded as bad rather than taken for a huge volume."""
    text = ds.get("NumberOfFrames", 1)
    try:
        frames = int(text or 1)
    except (TypeError, ValueError):
        raise ImageReadError(path, "the header's NumberOfFrames is not a number") from None
    if frames < 1:
        raise ImageReadError(path, f"the header declares {frames} frames")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 8) or 8)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    compressed = bool(getattr(syntax, "is_compressed", False))
    # uncompressed: every pixel is stored; compressed: every frame is at least one 8-byte fragment item
    needed = frames * 8 if compressed else (rows * columns * frames * samples * bits + 7) // 8
    size = Path(path).stat().st_size
    if needed > size:
        raise ImageReadError(path, f"the header declares {frames:,} frame(s) of {rows}x{columns} pixels "
                                   f"({needed:,} bytes of pixel data) but the file holds {size:,} bytes: header and data disagree")
    return frames


def require_finite(values: np.ndarray, path: str | Path, stage: str) -> np.ndarray:
    """``values`` unchanged when every one is finite, else :class:`ImageReadError`: a diagnosis is
    never computed from NaN or infinite pixels (whatever their share)."""
    bad = ~np.isfinite(values)
    if bad.any():
        raise ImageReadError(path, f"{int(bad.sum()):,} of {values.size:,} pixel values are NaN or infinite {stage}; "
                                   "an image with undefined values is refused")
    return values


@reads_one_file(quote=False)
def read_dicom_identity(path: str | Path) -> DicomIdentity:
    """A DICOM file's :class:`DicomIdentity`, from its header only."""
    return _identity(read_dicom_dataset(Path(path), stop_before_pixels=True))


def _identity(ds) -> DicomIdentity:  # noqa: ANN001
    pid = str(ds.get("PatientID", "") or "").strip()
    return DicomIdentity(patient_key(pid) if pid else None, str(ds.get("SOPInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                         body_tag(ds, "Modality"), body_tag(ds, "BodyPartExamined"))


def body_tag(ds, keyword: str) -> str:  # noqa: ANN001
    """A short code-string attribute (Modality, BodyPartExamined) upper-cased and stripped; "" when absent."""
    return str(ds.get(keyword, "") or "").strip().upper()


def read_dicom_pixels(path: Path):  # noqa: ANN201 - (pydicom.Dataset, np.ndarray)
    """A DICOM file's dataset and decoded stored values; :class:`ImageReadError` naming the file
    when it is not DICOM, holds no image (SEG, SR, ...), or its pixel data cannot be decoded."""
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    ds = read_dicom_dataset(path)
    declared_frames(ds, path)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _NON_IMAGE_SOP_CLASSES:
        raise ImageReadError(path, f"{_NON_IMAGE_SOP_CLASSES[sop_class]} has no image to classify")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(path, "the file has no pixel data")
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; all mean "cannot decode"
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageReadError(path, f"pixel data cannot be decoded (transfer syntax {name}): {str(exc).splitlines()[0][:200]}") from None
    if raw.size == 0:
        raise ImageReadError(path, "the image has no pixels")
    return ds, raw


def is_colour_dataset(ds) -> bool:  # noqa: ANN001
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    return int(ds.get("SamplesPerPixel", 1) or 1) == 3 or photometric.startswith(("RGB", "YBR"))


@reads_one_file(quote=False)
def dicom_frame_count(path: str | Path) -> int:
    """NumberOfFrames from the header alone, checked against the file's size (see
    :func:`declared_frames`); :class:`ImageReadError` for a file whose header cannot be read."""
    return declared_frames(read_dicom_dataset(Path(path), stop_before_pixels=True), Path(path))


@reads_one_file(quote=False)
def read_dicom(path: str | Path, window: str | tuple[float, float] | None = None) -> DicomImage:
    """Read a DICOM file's image as displayable intensities (see the module docstring)."""
    path = Path(path)
    ds, raw = read_dicom_pixels(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if is_colour_dataset(ds):
        pixels = _to_uint8_rgb(raw)
    else:
        pixels = grayscale_to_unit(ds, raw, parse_window(window), path)
    spacing = _spacing(ds)
    return DicomImage(
        pixels=pixels,
        modality=str(ds.get("Modality", "")),
        identity=_identity(ds),
        spacing=spacing,
        frames=frames,
        bits_stored=int(ds.get("BitsStored", 0) or 0),
    )


def grayscale_to_unit(ds, raw: np.ndarray, window: tuple[float, float] | None, path: str | Path) -> np.ndarray:  # noqa: ANN001
    """Modality LUT, then VOI, then MONOCHROME1 inversion: float32 in [0, 1]. :class:`ImageReadError`
    naming ``path`` when a value is NaN or infinite after the Modality LUT or the VOI LUT."""
    from pydicom.pixels import apply_voi_lut

    values = require_finite(modality_values(ds, raw), path, "after the Modality LUT (stored values x RescaleSlope + RescaleIntercept)")
    file_window = dicom_window(ds)
    if window is not None:
        out = apply_window(values, *window)
    elif "VOILUTSequence" in ds:
        lut = apply_voi_lut(values, ds, index=0).astype(np.float64)
        out = _min_max(lut)
    elif file_window is not None:
        out = apply_window(values, *file_window)
    else:
        out = _min_max(values)
    require_finite(out, path, "after the VOI LUT")
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def functional_group_value(ds, sequence: str, keyword: str, frame: int = 0):  # noqa: ANN001, ANN201
    """An attribute of an enhanced multi-frame file: from frame ``frame``'s functional group
    ``sequence`` (e.g. ``PixelMeasuresSequence``), else from the shared functional groups, else
    the top-level attribute; None where none has it."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        inner = items[index].get(sequence) if items is not None and len(items) > index else None
        if inner is not None and len(inner) and keyword in inner[0]:
            return inner[0][keyword].value
    element = ds.get(keyword)
    return element if element is not None and element != "" else None


def modality_values(ds, raw: np.ndarray, frame: int = 0) -> np.ndarray:  # noqa: ANN001
    """Stored values through the Modality LUT (RescaleSlope/Intercept, or a Modality LUT
    sequence) to physical values, float64. Enhanced multi-frame files keep the rescale in their
    functional groups (Pixel Value Transformation), per frame or shared."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return apply_modality_lut(raw, ds).astype(np.float64)
    slope = functional_group_value(ds, "PixelValueTransformationSequence", "RescaleSlope", frame)
    intercept = functional_group_value(ds, "PixelValueTransformationSequence", "RescaleIntercept", frame)
    values = raw.astype(np.float64)
    if slope is not None and intercept is not None:
        values = values * float(slope) + float(intercept)
    return values


def dicom_window(ds, frame: int = 0) -> tuple[float, float] | None:  # noqa: ANN001
    """The (center, width) the file suggests (top level, or its Frame VOI LUT functional group);
    None when it suggests none, or an unusable one (not a number, infinite, or a width <= 0: then
    the image is scaled by its own minimum and maximum, as when no window is given)."""
    center = functional_group_value(ds, "FrameVOILUTSequence", "WindowCenter", frame)
    width = functional_group_value(ds, "FrameVOILUTSequence", "WindowWidth", frame)
    if center is None or width is None:
        return None
    try:
        c, w = first_value(center), first_value(width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if np.isfinite(c) and np.isfinite(w) and w > 0 else None


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), mapped to [0, 1]."""
    width = max(float(width), 1.0)
    low = center - 0.5 - (width - 1) / 2
    return np.clip((values - low) / (width - 1), 0.0, 1.0) if width > 1 else (values > center - 0.5).astype(np.float64)


def _spacing(ds) -> tuple[float, float] | None:  # noqa: ANN001
    """(row, column) spacing in mm from PixelSpacing, else ImagerPixelSpacing; None if absent or zero."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
            return float(value[0]), float(value[1])
    return None


def first_value(value: object) -> float:
    """The first of a multi-valued DICOM attribute (e.g. WindowCenter), or the value itself."""
    try:
        return float(value[0])  # type: ignore[index]
    except TypeError:
        return float(value)  # type: ignore[arg-type]


def _min_max(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _to_uint8_rgb(raw: np.ndarray) -> np.ndarray:
    if raw.dtype == np.uint8:
        return raw
    return np.round(_min_max(raw.astype(np.float64)) * 255).astype(np.uint8)


def unit_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 0..255 (rounded)."""
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
