"""The ``DATA`` argument of every command: a MedMNIST name, an image folder or a CSV manifest."""

from __future__ import annotations

from pathlib import Path

from meddiag.data.covariates import TabularSpec, read_covariates
from meddiag.data.dataset import ImageData
from meddiag.data.files import FileRecord, load_file_records
from meddiag.data.folder import scan_image_folder
from meddiag.data.images import Fit
from meddiag.data.manifest import read_manifest
from meddiag.data.medmnist import load_medmnist, medmnist_names, parse_medmnist
from meddiag.errors import ConfigError, DataError


def load_data(
    spec: str,
    *,
    image_size: int | None = None,
    fit: Fit = "pad",
    window: str | None = None,
    volume_index: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    progress: bool = True,
    medmnist_root: str | Path | None = None,
    positive_class: str | None = None,
    covariates: TabularSpec | None = None,
    cache: str | Path | None = "auto",
    memory_mb: float | None = None,
) -> ImageData:
    """Read the data set ``spec`` into memory with train/val/test splits.

    ``spec`` is a MedMNIST name (``pneumoniamnist``, ``pneumoniamnist@64``), a folder
    (``ROOT/CLASS/*`` or ``ROOT/{train,val,test}/CLASS/*``) or a ``.csv`` manifest.
    ``image_size`` None keeps a MedMNIST file's own size, and is 128 for files.
    ``window`` is the VOI window for DICOM files (see :func:`meddiag.data.dicom.parse_window`);
    ``volume_index`` the volume taken from 4D NIfTI files; ``medmnist_root`` the folder holding
    MedMNIST files (default ``$MEDDIAG_DATA``). ``positive_class``: the finding of a two-class task
    (see :mod:`meddiag.data.classes`). ``covariates``: the patient data to read with each image
    (manifest columns and/or a joined table; see :mod:`meddiag.data.covariates`); manifests only.
    ``cache``: where files prepared once are kept for every later run (``auto``, ``off`` or a folder; see
    :mod:`meddiag.data.cache`); MedMNIST files are arrays already and need none. ``memory_mb``: prepared
    images taking more than this stay in the cache and are read as they are used (None: always in memory).
    """
    mnist = parse_medmnist(spec)
    wants_covariates = covariates is not None and (covariates.columns or covariates.tabular is not None)
    if wants_covariates and not spec.lower().endswith(".csv"):
        raise ConfigError(f"covariates are read from a CSV manifest's columns (path,label,<covariates>...); {spec} is not one")
    if mnist is not None:
        return load_medmnist(mnist, image_size, Path(medmnist_root) if medmnist_root else None, positive_class)
    path = Path(spec).expanduser()
    if not path.exists():
        hint = "" if any(c in spec for c in "/\\.") else f" (MedMNIST names: {', '.join(medmnist_names())})"
        raise DataError(f"{spec}: no such file or folder, and not a MedMNIST data set name{hint}")
    if path.is_dir():
        records = scan_image_folder(path)
    elif path.suffix.lower() == ".csv":
        records = read_manifest(path)
    else:
        raise DataError(f"{spec}: expected a folder of class folders or a .csv manifest")
    table, join = None, {}
    if wants_covariates:
        assert covariates is not None
        keys = [join_key(r, covariates.join) for r in records]
        if covariates.tabular is not None and not any(keys):
            raise ConfigError(f"--join {covariates.join}: {path} has no such column, or it is empty in every row")
        table, join = read_covariates([r.meta for r in records], [r.line for r in records], keys, covariates, str(path))
        for i, rec in enumerate(records):
            rec.covariate_row = i
    data = load_file_records(
        records, str(path), image_size=image_size, fit=fit, window=window, volume_index=volume_index, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, progress=progress, positive_class=positive_class,
        covariates=table, cache=cache, memory_mb=memory_mb,
    )
    data.source = str(path.resolve())
    data.covariate_join = join
    return data


def join_key(record: FileRecord, column: str) -> str | None:
    """The value of ``column`` (patient_id, path, or any manifest column) that joins ``record`` to a table."""
    if column == "patient_id":
        return record.patient_id
    if column == "path":
        return str(record.path)
    return (record.meta.get(column) or "").strip() or None
