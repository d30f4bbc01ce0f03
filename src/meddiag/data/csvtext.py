"""Reading a CSV file a person made (manifest, covariate table): errors name the file, never a traceback."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from meddiag.errors import DataError


def read_csv(path: str | Path) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, rows, the file line of each row) of a UTF-8 CSV (a byte-order mark is allowed; blank lines
    are skipped); DataError naming ``path`` for text that is not UTF-8, NUL bytes or broken quoting."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as a UTF-8 CSV") from None
    if "\0" in text:
        raise DataError(f"{path} holds NUL bytes: not a text CSV (is it a spreadsheet file renamed .csv?)")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path} is empty")
    return rows[0], rows[1:], lines[1:]


def read_csv_dicts(path: str | Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """(header as written, rows as {column: text}, their lines); short rows get empty cells, extra cells are dropped."""
    header, rows, lines = read_csv(path)
    return header, [{h: (row[i] if i < len(row) else "") for i, h in enumerate(header)} for row in rows], lines
