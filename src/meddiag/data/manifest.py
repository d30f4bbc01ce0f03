"""CSV manifests: columns ``path,label`` with optional ``split`` and ``patient_id``.

Paths are relative to the CSV file (absolute paths are kept as they are). Any other column
(sex, age_group, site, scanner, ...) is kept with each image as an attribute, so that
evaluation can report every metric per subgroup.
"""

from __future__ import annotations

import math
from pathlib import Path

from meddiag.data.csvtext import read_csv_dicts
from meddiag.data.files import FileRecord
from meddiag.errors import DataError

_KNOWN = {"path", "label", "split", "patient_id"}
_TARGETS = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": math.nan, "nan": math.nan, "-1": math.nan, "-1.0": math.nan}
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_manifest(csv_path: str | Path) -> list[FileRecord]:
    """Parse a manifest into file records; errors name the CSV line that is wrong.

    Single-label: a ``label`` column. Multi-label (several findings per image): no ``label``
    column, and one column per finding holding 1 (present), 0 (absent), or nothing / ``nan`` /
    ``-1`` (not recorded or uncertain: left out of that finding's loss and metrics, never read as
    absent). Every column whose values are all of these is a finding; others are attributes.
    """
    csv_path = Path(csv_path)
    header, rows, lines = read_csv_dicts(csv_path)
    columns = {c.strip().lower(): c for c in header}
    if "path" not in columns:
        raise DataError(f"{csv_path} needs the columns path and label (multi-label: path and one 1/0/empty column "
                        f"per finding); missing: path")
    findings: list[str] = []
    if "label" not in columns:
        findings = [c for c in columns if c not in _KNOWN and rows and all((r[columns[c]] or "").strip().lower() in _TARGETS for r in rows)]
        if len(findings) < 2:
            raise DataError(f"{csv_path} needs the columns path and label (multi-label: path and two or more 1/0/empty "
                            f"columns, one per finding); missing: label")
    records = []
    for line, row in zip(lines, rows):
        path_text = (row[columns["path"]] or "").strip()
        label = (row[columns["label"]] or "").strip() if not findings else ""
        if not path_text or not (label or findings):
            raise DataError(f"{csv_path}, line {line}: empty path or label")
        split = None
        if "split" in columns and (row[columns["split"]] or "").strip():
            split_text = row[columns["split"]].strip().lower()
            if split_text not in _SPLITS:
                raise DataError(f"{csv_path}, line {line}: split must be train, val or test, not '{split_text}'")
            split = _SPLITS[split_text]
        patient = (row[columns["patient_id"]] or "").strip() or None if "patient_id" in columns else None
        path = Path(path_text)
        meta = {c: (row[original] or "").strip() for c, original in columns.items() if c not in _KNOWN and c not in findings}
        targets = {c: _TARGETS[(row[columns[c]] or "").strip().lower()] for c in findings} if findings else None
        records.append(FileRecord(path if path.is_absolute() else csv_path.parent / path, label, split, patient, meta, targets, line))
    if not records:
        raise DataError(f"{csv_path} lists no images")
    return records


def manifest_paths(csv_path: str | Path) -> list[Path]:
    """The image paths a CSV lists in its ``path`` column (relative to the CSV; no label needed: new data
    to predict or test for shift). Errors name the file and line."""
    csv_path = Path(csv_path)
    header, rows, lines = read_csv_dicts(csv_path)
    columns = {c.strip().lower(): c for c in header}
    if "path" not in columns:
        raise DataError(f"{csv_path} has no 'path' column naming the image files")
    out = []
    for line, row in zip(lines, rows):
        text = (row[columns["path"]] or "").strip()
        if not text:
            raise DataError(f"{csv_path}, line {line}: empty path")
        path = Path(text)
        out.append(path if path.is_absolute() else csv_path.parent / path)
    if not out:
        raise DataError(f"{csv_path} lists no images")
    return out
