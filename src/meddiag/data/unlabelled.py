"""The ``DATA`` of ``meddiag pretrain``: images without labels, from any folder, manifest, DICOM tree or MedMNIST set.

Only training images are read where a source says which those are, so that pretraining never sees
the images a later evaluation tests on: a MedMNIST set's train split, a folder's ``train/``
sub-folder when it has ``train``/``val``/``test`` ones, a manifest's ``split=train`` rows when it
has a ``split`` column. Anything else is read whole: every file under a folder (recursively; DICOM
series folders as volumes for 3D data), every ``path`` of a manifest (no ``label`` needed).
"""

from __future__ import annotations

from pathlib import Path

from meddiag.data.collect import collect_image_files, collect_volume_sources
from meddiag.data.csvtext import read_csv_dicts
from meddiag.data.files import FileRecord, UnlabelledImages, read_unlabelled
from meddiag.data.folder import split_folders
from meddiag.data.images import Fit
from meddiag.data.medmnist import load_medmnist, parse_medmnist
from meddiag.errors import DataError


def load_unlabelled(spec: str, *, image_size: int | None = None, fit: Fit = "pad", window: str | None = None,
                    volume_index: int | None = None, volumes: bool = False, progress: bool = True,
                    medmnist_root: str | Path | None = None, cache: str | Path | None = "auto",
                    memory_mb: float | None = None) -> UnlabelledImages:
    """The images of ``spec`` (see the module's docstring), labels ignored. ``volumes``: look for 3D
    volumes (NIfTI files, DICOM series folders) under a folder rather than for 2D image files."""
    mnist = parse_medmnist(spec)
    if mnist is not None:
        data = load_medmnist(mnist, image_size, Path(medmnist_root) if medmnist_root else None)
        train = data.splits["train"]
        return UnlabelledImages(data.name, train.images, None, data.image_size, data.spatial_dims,
                                note=f"the training split of {data.name} ({len(train)} images)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"{spec}: no such file or folder, and not a MedMNIST data set name")
    note = ""
    if path.is_dir():
        splits = split_folders(path)
        root = splits.get("train", path)
        if root != path:
            note = f"only {root} (its train split): the images of {', '.join(str(p) for k, p in splits.items() if k != 'train')} are left for evaluation"
        found, failures = (collect_volume_sources if volumes else collect_image_files)([root])
        if not found:
            raise DataError(f"{root}: {failures[0].reason if failures else 'no images found'}")
        records = [FileRecord(path=f, label="") for f in found]
    elif path.suffix.lower() == ".csv":
        records, note = _manifest_records(path)
    else:
        raise DataError(f"{spec}: expected a folder, a .csv manifest or a MedMNIST name")
    data = read_unlabelled(records, str(path), image_size=image_size, fit=fit, window=window,
                           volume_index=volume_index, progress=progress, cache=cache, memory_mb=memory_mb)
    data.note = note or f"{len(data.images)} images under {path}"
    return data


def _manifest_records(csv_path: Path) -> tuple[list[FileRecord], str]:
    header, rows, lines = read_csv_dicts(csv_path)
    columns = {c.strip().lower(): c for c in header}
    if "path" not in columns:
        raise DataError(f"{csv_path} has no 'path' column naming the image files")
    split_column = columns.get("split")
    has_train = split_column is not None and any((r[split_column] or "").strip().lower() in ("train", "training") for r in rows)
    records = []
    for line, row in zip(lines, rows):
        text = (row[columns["path"]] or "").strip()
        if not text:
            raise DataError(f"{csv_path}, line {line}: empty path")
        if has_train and (row[split_column] or "").strip().lower() not in ("train", "training", ""):  # type: ignore[index]
            continue
        path = Path(text)
        records.append(FileRecord(path=path if path.is_absolute() else csv_path.parent / path, label="", line=line))
    if not records:
        raise DataError(f"{csv_path} lists no images")
    return records, f"the split=train rows of {csv_path}" if has_train else ""
