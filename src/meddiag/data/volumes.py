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

from meddiag.data.dicom import apply_window, first_value, parse_window, read_dicom_dataset
from meddiag.errors import DataError, ImageReadError

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
    series_instance_uid: str = ""
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


def read_volumes(path: str | Path) -> list[Volume]:
    """The volumes at ``path``: a NIfTI file is one; a folder of DICOM files is one per series."""
    path = Path(path)
    if path.is_file() and is_nifti_file(path):
        return [read_nifti(path)]
    if path.is_dir():
        return read_dicom_series(path)
    raise ImageReadError(path, "not a NIfTI file (.nii, .nii.gz) or a folder holding a DICOM series")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip the first three axes of ``array`` to RAS+, updating the affine."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return np.ascontiguousarray(canonical), new_affine


def is_nifti_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


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
    array, affine = to_canonical(data.astype(np.float32), img.affine)
    return Volume(array=array, affine=affine, sources=[str(path)])


def read_dicom_series(folder: str | Path) -> list[Volume]:
    """Every series in a folder of DICOM files (one file per slice), each as a RAS+ volume.

    Files are grouped by SeriesInstanceUID and sorted along the slice normal by
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
        except ImageReadError as exc:
            excluded.append((exc.path, exc.reason))
            continue
        if "PixelData" not in ds:
            excluded.append((str(path), "the file has no pixel data"))
            continue
        by_series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    if not by_series:
        raise DataError(f"{folder} holds no DICOM images ({len(excluded)} files could not be used)")
    volumes = [_series_volume(slices) for _, slices in sorted(by_series.items())]
    for v in volumes:
        v.excluded = excluded
    return volumes


def _series_volume(slices: list) -> Volume:
    from pydicom.pixels import apply_modality_lut

    first = slices[0][1]
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ImageReadError(path, f"slice is {ds.Rows}x{ds.Columns} but its series' slices are {shape[0]}x{shape[1]}")
    orientation = first.get("ImageOrientationPatient")
    has_positions = orientation is not None and all("ImagePositionPatient" in ds for _, ds in slices)
    if has_positions:
        row_dir = np.array(orientation[:3], dtype=float)  # direction of increasing column index
        col_dir = np.array(orientation[3:], dtype=float)  # direction of increasing row index
        normal = np.cross(row_dir, col_dir)
        slices = sorted(slices, key=lambda s: float(np.dot(normal, np.array(s[1].ImagePositionPatient, dtype=float))))
        positions = [float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))) for _, ds in slices]
        gaps = np.diff(positions)
        if len(gaps) and np.any(np.isclose(gaps, 0)):
            dup = slices[int(np.flatnonzero(np.isclose(gaps, 0))[0]) + 1][0]
            raise ImageReadError(dup, "two slices of the series share one position")
        step = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1.0) or 1.0)
    else:
        slices = sorted(slices, key=lambda s: int(s[1].get("InstanceNumber", 0) or 0))
        row_dir, col_dir, normal = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])
        step = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
    first = slices[0][1]  # after sorting: the origin and geometry are the first slice's
    arrays = []
    for path, ds in slices:
        try:
            arrays.append(apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
        except Exception as exc:  # noqa: BLE001
            raise ImageReadError(path, f"pixel data cannot be decoded ({str(exc).splitlines()[0][:150]})") from None
    stack = np.stack(arrays)  # (slice, row, column)
    spacing = first.get("PixelSpacing") or [1.0, 1.0]
    dr, dc = float(spacing[0]), float(spacing[1])
    origin = np.array(first.get("ImagePositionPatient", [0, 0, 0]), dtype=float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = normal * step, col_dir * dr, row_dir * dc, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM patient space is LPS+
    array, affine = to_canonical(stack, ras)
    window = None
    if "WindowCenter" in first and "WindowWidth" in first:
        window = (first_value(first.WindowCenter), first_value(first.WindowWidth))
    return Volume(
        array=array, affine=affine, modality=str(first.get("Modality", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")), window=window,
        sources=[str(p) for p, _ in slices],
    )
