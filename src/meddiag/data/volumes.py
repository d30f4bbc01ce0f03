"""3D volumes from DICOM series and NIfTI files, in one canonical orientation.

Every volume comes out in nibabel's closest canonical orientation, RAS+: increasing array
index 0 moves towards the patient's Right, index 1 towards Anterior, index 2 towards
Superior. A DICOM series and a NIfTI file of the same scan give the same array, and left
stays left whatever order the scanner stored the voxels in.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiag.data.dicom import (
    apply_window,
    body_tag,
    declared_frames,
    dicom_window,
    functional_group_value,
    is_colour_dataset,
    is_dicom_file,
    modality_values,
    parse_window,
    read_dicom_dataset,
    read_dicom_pixels,
    require_finite,
)
from meddiag.errors import DataError, ImageReadError, WrongKindError, reads_one_file

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D image in RAS+ orientation.

    array: float32 (X, Y, Z) physical values (Hounsfield units for CT, scanner units for MR).
    affine: 4x4 voxel index -> RAS+ millimetres.
    window: the (center, width) the source suggests for display, if any.
    excluded: (path, reason) of files left out of a series.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = ""
    body_part: str = ""  # DICOM BodyPartExamined, upper case ("" when absent or not DICOM)
    series_instance_uid: str = ""
    sop_instance_uid: str = ""  # a multi-frame DICOM file's own object UID (a series has one per slice)
    window: tuple[float, float] | None = None
    sources: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def to_unit(self, window: str | tuple[float, float] | None = None) -> np.ndarray:
        """float32 in [0, 1]: ``window`` if given, else the source's window, else min-max."""
        chosen = parse_window(window) or self.window
        if chosen is not None:
            return apply_window(self.array, *chosen).astype(np.float32)
        lo, hi = float(self.array.min()), float(self.array.max())
        return ((self.array - lo) / (hi - lo) if hi > lo else np.zeros_like(self.array)).astype(np.float32)


def volume_to_model_input(volume: Volume, image_size: int, channels: int = 1,
                          window: str | tuple[float, float] | None = None, fit: str = "pad") -> np.ndarray:
    """A volume as model input, uint8 of shape (channels, S, S, S), windowed to [0, 1] then resized
    (trilinear). ``fit="pad"`` keeps the physical proportions: the longest extent in mm fills S voxels,
    the others are scaled alike and padded with zeros, centred. ``"stretch"`` resizes each axis to S."""
    import torch
    import torch.nn.functional as F

    unit = torch.from_numpy(volume.to_unit(window))[None, None]
    if fit == "stretch":
        shape = (image_size,) * 3
    else:
        extent = np.array(volume.array.shape) * np.array(volume.spacing)
        shape = tuple(int(max(1, round(e * image_size / extent.max()))) for e in extent)
    resized = F.interpolate(unit, size=shape, mode="trilinear", align_corners=False)[0]
    out = np.zeros((1, image_size, image_size, image_size), np.uint8)
    start = [(image_size - s) // 2 for s in shape]
    out[(slice(None), *[slice(b, b + s) for b, s in zip(start, shape)])] = (resized.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.repeat(out, channels, axis=0) if channels > 1 else out


@reads_one_file(quote=False)  # a series folder's errors may come from pydicom, whose messages can quote header values
def read_volumes(path: str | Path, volume_index: int | None = None) -> list[Volume]:
    """The volumes at ``path``: a NIfTI file is one (``volume_index`` picks one of a 4D file's);
    a multi-frame DICOM file is one; a folder of DICOM files is one per series."""
    path = Path(path)
    if path.is_file() and is_nifti_file(path):
        return [read_nifti(path, volume_index)]
    if path.is_file() and is_dicom_file(path):
        return [read_dicom_volume(path)]
    if path.is_dir():
        return read_dicom_series(path)
    raise ImageReadError(path, "not a NIfTI file (.nii, .nii.gz), a multi-frame DICOM file, or a folder holding a DICOM series")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip the first three axes of ``array`` to RAS+, updating the affine."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return np.ascontiguousarray(canonical), new_affine


def is_nifti_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@reads_one_file
def read_nifti(path: str | Path, volume_index: int | None = None) -> Volume:
    """A NIfTI-1/2 file as a RAS+ volume. A 4D file needs ``volume_index`` (which 3D volume)."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise ImageReadError(path, f"not a readable NIfTI file ({exc.__class__.__name__}: {str(exc)[:120]})") from None
    data = np.squeeze(data, axis=tuple(range(4, data.ndim))) if data.ndim > 4 else data
    if data.ndim == 4:
        n = data.shape[3]
        if volume_index is None:
            raise ImageReadError(path, f"a 4D file with {n} volumes: choose one (volume index 0..{n - 1})")
        if not 0 <= volume_index < n:
            raise ImageReadError(path, f"volume index {volume_index} is outside 0..{n - 1}")
        data = data[..., volume_index]
    if data.ndim != 3 or min(data.shape) == 0:
        raise ImageReadError(path, f"expected a 3D volume, found shape {data.shape}")
    if not np.isfinite(img.affine).all():
        raise ImageReadError(path, "the header's voxel-to-world transform (affine) holds NaN or infinite values")
    array, affine = to_canonical(require_finite(data.astype(np.float32), path, "in the volume"), img.affine)
    return Volume(array=array, affine=affine, sources=[str(path)])


def read_dicom_series(folder: str | Path) -> list[Volume]:
    """Every series in a folder of DICOM files (one file per slice), each as a RAS+ volume.

    Files are grouped by SeriesInstanceUID (multi-frame files, volumes of their own, are left out) and sorted along the slice normal by
    ImagePositionPatient (InstanceNumber when positions are missing). Files that are not
    DICOM or hold no image are listed in each volume's ``excluded``; slices whose size
    differs from the rest of their series make that series an error naming the file.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder} contains no files")
    by_series: dict[str, list] = defaultdict(list)
    excluded: list[tuple[str, str]] = []
    for path in files:
        try:
            ds = read_dicom_dataset(path)
            if "PixelData" not in ds:
                raise ImageReadError(path, "the file has no pixel data")
            if declared_frames(ds, path) > 1:
                raise ImageReadError(path, "a multi-frame DICOM file is a volume of its own, not a slice of a series")
            if not (int(ds.get("Rows", 0) or 0) and int(ds.get("Columns", 0) or 0)):
                raise ImageReadError(path, "the header gives no image size (Rows, Columns)")
        except ImageReadError as exc:
            excluded.append((exc.path, exc.reason))
            continue
        except Exception as exc:  # noqa: BLE001 - one damaged slice header is that slice's problem
            excluded.append((str(path), f"corrupt DICOM header ({exc.__class__.__name__})"))
            continue
        by_series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if not by_series:
        raise DataError(f"{folder} holds no DICOM images ({len(excluded)} files could not be used)")
    volumes = [_series_volume(slices) for _, slices in sorted(by_series.items())]
    for v in volumes:
        v.excluded = excluded
    return volumes


def _series_volume(slices: list) -> Volume:
    first = slices[0][1]
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ImageReadError(path, f"slice is {ds.Rows}x{ds.Columns} but its series' slices are {shape[0]}x{shape[1]}")
    orientation = first.get("ImageOrientationPatient")
    positions = [ds.get("ImagePositionPatient") for _, ds in slices]
    if orientation is None or any(p is None for p in positions):
        slices = sorted(slices, key=lambda s: int(s[1].get("InstanceNumber", 0) or 0))
        orientation, positions = None, None
    fallback_step = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    try:
        order, affine = _stack_geometry(len(slices), orientation, positions, first.get("PixelSpacing"), fallback_step)
    except _SharedPosition as dup:
        raise ImageReadError(slices[dup.index][0], "two slices of the series share one position") from None
    slices = [slices[i] for i in order]
    first = slices[0][1]
    arrays = []
    for path, ds in slices:
        try:
            arrays.append(modality_values(ds, ds.pixel_array).astype(np.float32))
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(path, f"pixel data cannot be decoded ({str(exc).splitlines()[0][:150]})") from None
        require_finite(arrays[-1], path, "after the Modality LUT")
    array, affine = to_canonical(np.stack(arrays), affine)  # stacked as (slice, row, column)
    return Volume(
        array=array, affine=affine, modality=str(first.get("Modality", "")), body_part=body_tag(first, "BodyPartExamined"),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")), window=dicom_window(first),
        sources=[str(p) for p, _ in slices],
    )


@reads_one_file(quote=False)
def read_dicom_volume(path: str | Path) -> Volume:
    """A multi-frame DICOM file (enhanced CT/MR, or a legacy multi-frame such as an MR stack or
    an ultrasound cine loop) as a RAS+ volume.

    Enhanced files give each frame's position and the shared orientation and pixel spacing in
    their functional groups: frames are sorted along the slice normal as a series' slices are.
    Without positions the frames keep their stored order, spaced by SpacingBetweenSlices (or
    SliceThickness, or 1 mm). Colour frames become their luminance.
    """
    path = Path(path)
    ds, raw = read_dicom_pixels(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2:
        raise WrongKindError(path, "a single-frame DICOM is a 2D image; this model reads volumes")
    if is_colour_dataset(ds):
        raw = raw.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma
    positions = [functional_group_value(ds, "PlanePositionSequence", "ImagePositionPatient", f) for f in range(frames)]
    orientation = functional_group_value(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    if orientation is None or any(p is None for p in positions):
        orientation, positions = None, None
    spacing = functional_group_value(ds, "PixelMeasuresSequence", "PixelSpacing")
    step = functional_group_value(ds, "PixelMeasuresSequence", "SpacingBetweenSlices") or \
        functional_group_value(ds, "PixelMeasuresSequence", "SliceThickness") or 1.0
    try:
        order, affine = _stack_geometry(frames, orientation, positions, spacing, float(step))
    except _SharedPosition as dup:
        raise ImageReadError(path, f"frame {dup.index + 1} shares its position with another frame") from None
    stack = np.stack([modality_values(ds, raw[i], i) for i in order]).astype(np.float32)
    require_finite(stack, path, "after the Modality LUT")
    array, affine = to_canonical(stack, affine)
    return Volume(
        array=array, affine=affine, modality=str(ds.get("Modality", "")), body_part=body_tag(ds, "BodyPartExamined"),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        window=dicom_window(ds), sources=[str(path)],
    )


class _SharedPosition(Exception):
    """Two slices at one position along the normal; ``index`` is the second, in input order."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _stack_geometry(n: int, orientation, positions, pixel_spacing, fallback_step: float) -> tuple[list[int], np.ndarray]:  # noqa: ANN001
    """The order that sorts ``n`` slices along their normal, and the RAS+ affine of the sorted stack
    indexed (slice, row, column).

    ``orientation``: ImageOrientationPatient (row then column direction cosines) and
    ``positions``: each slice's ImagePositionPatient, both in DICOM's LPS+ space; None keeps the
    given order along an assumed axial normal, ``fallback_step`` mm apart.
    """
    if orientation is not None and positions is not None:
        row_dir = np.array(orientation[:3], dtype=float)  # direction of increasing column index
        col_dir = np.array(orientation[3:], dtype=float)  # direction of increasing row index
        normal = np.cross(row_dir, col_dir)
        along = [float(np.dot(normal, np.array(p, dtype=float))) for p in positions]
        order = sorted(range(n), key=along.__getitem__)
        gaps = np.diff([along[i] for i in order])
        if len(gaps) and np.any(np.isclose(gaps, 0)):
            raise _SharedPosition(order[int(np.flatnonzero(np.isclose(gaps, 0))[0]) + 1])
        step = float(np.median(gaps)) if len(gaps) else fallback_step
        origin = np.array(positions[order[0]], dtype=float)
    else:
        row_dir, col_dir, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        order, step, origin = list(range(n)), fallback_step, np.zeros(3)
    spacing = pixel_spacing if pixel_spacing is not None and len(pixel_spacing) == 2 else [1.0, 1.0]
    dr, dc = float(spacing[0]), float(spacing[1])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = normal * step, col_dir * dr, row_dir * dc, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS+
    return order, ras
