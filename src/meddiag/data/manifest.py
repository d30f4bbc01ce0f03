"""CSV manifests: columns ``path,label`` with optional ``split`` and ``patient_id``.

Paths are relative to the CSV file (absolute paths are kept as they are). Any other column
(sex, age_group, site, scanner, ...) is kept with each image as an attribute, so that
evaluation can report every metric per subgroup.
"""

from __future__ import annotations

import csv
from pathlib import Path

from meddiag.data.files import FileRecord
from meddiag.errors import DataError

_KNOWN = {"path", "label", "split", "patient_id"}
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_manifest(csv_path: str | Path) -> list[FileRecord]:
    """Parse a manifest into file records; errors name the CSV line that is wrong."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        missing = {"path", "label"} - set(columns)
        if missing:
            raise DataError(f"{csv_path} needs the columns path and label; missing: {', '.join(sorted(missing))}")
        records = []
        for line, row in enumerate(reader, start=2):
            path_text = (row[columns["path"]] or "").strip()
            label = (row[columns["label"]] or "").strip()
            if not path_text or not label:
                raise DataError(f"{csv_path}, line {line}: empty path or label")
            split = None
            if "split" in columns and (row[columns["split"]] or "").strip():
                split_text = row[columns["split"]].strip().lower()
                if split_text not in _SPLITS:
                    raise DataError(f"{csv_path}, line {line}: split must be train, val or test, not '{split_text}'")
                split = _SPLITS[split_text]
            patient = (row[columns["patient_id"]] or "").strip() or None if "patient_id" in columns else None
            path = Path(path_text)
            meta = {c: (row[original] or "").strip() for c, original in columns.items() if c not in _KNOWN}
            records.append(FileRecord(path if path.is_absolute() else csv_path.parent / path, label, split, patient, meta))
    if not records:
        raise DataError(f"{csv_path} lists no images")
    return records
