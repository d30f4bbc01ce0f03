"""Finding what to diagnose under the paths a user gives: image files, volumes, folders of either.

Anything that cannot be used becomes a :class:`Failure` with its path and reason, never a silent skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meddiag.data.dicom import dicom_frame_count, is_dicom_file
from meddiag.data.files import is_volume_source
from meddiag.data.folder import class_items
from meddiag.data.images import is_image_file
from meddiag.data.volumes import is_nifti_file
from meddiag.errors import ImageReadError, failure_reason


@dataclass
class Failure:
    path: str
    reason: str


def collect_volume_sources(paths: list[str | Path]) -> tuple[list[Path], list[Failure]]:
    """The volumes under ``paths``: NIfTI and multi-frame DICOM files; a folder holding
    single-frame DICOM files is one series; other folders are searched for volumes. 2D images
    found there are failures (a 3D model cannot diagnose them), never skipped silently."""
    sources: list[Path] = []
    failures: list[Failure] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            failures.append(Failure(str(path), "no such file or folder"))
        elif path.is_file():
            sources.append(path)
        elif _holds_series(path):
            # the folder's single-frame DICOM files are one series; its NIfTI and multi-frame files are volumes of their own
            sources.append(path)
            sources += [f for f in sorted(path.iterdir()) if f.is_file() and not f.name.startswith(".") and _own_volume(f)]
        else:
            found = class_items(path)
            for item in found:
                try:
                    volume = item.is_dir() or is_volume_source(item)
                except Exception as exc:  # noqa: BLE001 - a damaged header fails this file only
                    failures.append(Failure(str(item), failure_reason(exc)))
                    continue
                if volume:
                    sources.append(item)
                elif is_image_file(item):
                    failures.append(Failure(str(item), "a 2D image; this model diagnoses volumes"))
                else:
                    failures.append(Failure(str(item), "not a volume meddiag reads (NIfTI, multi-frame DICOM, or a folder holding a DICOM series)"))
            if not found:
                failures.append(Failure(str(path), "folder contains no volumes (NIfTI files, multi-frame DICOM files or DICOM series folders)"))
    return sources, failures


def _own_volume(path: Path) -> bool:
    try:
        return is_nifti_file(path) or (is_dicom_file(path) and dicom_frame_count(path) > 1)
    except ImageReadError:
        return False


def _holds_series(folder: Path) -> bool:
    def single_frame(f: Path) -> bool:
        try:
            return dicom_frame_count(f) == 1
        except ImageReadError:
            return False

    return any(f.is_file() and is_dicom_file(f) and single_frame(f) for f in folder.iterdir())


def collect_image_files(paths: list[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Expand folders recursively into every file not hidden (no part of its path under the folder
    starts with '.'): files that are not images fail when read, each named with its reason, never
    left out unseen. Missing paths become failures."""
    files: list[Path] = []
    failures: list[Failure] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                failures.append(Failure(str(path), "folder contains no files"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            failures.append(Failure(str(path), "no such file or folder"))
    return files, failures


def collect_sources(paths: list[str | Path], spatial_dims: int) -> tuple[list[Path], list[Failure]]:
    """What a model of ``spatial_dims`` reads under ``paths``: image files (2D) or volume sources (3D)."""
    return collect_volume_sources(paths) if spatial_dims == 3 else collect_image_files(paths)
