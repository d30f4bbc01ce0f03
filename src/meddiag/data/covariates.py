"""Patient data beside the images: clinical and genomic covariates, read, typed, checked and encoded.

Two sources, both by column name:

- the manifest's own columns (``--covariates age,sex,localization``), each a *block* of its own;
- a second table joined by a key (``--tabular genomics.csv --join patient_id --tabular-columns 'gene_*'``),
  wide or not, one block; patients absent from it have that whole block missing.

Types are inferred (a column whose every present value is a number is numeric, else categorical)
or forced (``age:num``, ``site:cat``). Missing values (blank, ``nan``, ``NA``, ``unknown`` by default)
are the normal case: a numeric value gets a missing indicator and the training median, a categorical
one an explicit "missing" level. Everything fitted (medians, means, levels) comes from the training
split only (:meth:`CovariateSchema.fit`); the schema travels in the model card so that predicting
encodes new patients exactly as training did. Values that cannot be right (text in a numeric column, a
negative age, an infinite number) are errors naming the file, line and column.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from meddiag.data.csvtext import read_csv, read_csv_dicts
from meddiag.errors import ConfigError, DataError

Kind = Literal["num", "cat"]
DEFAULT_MISSING = ("", "nan", "na", "n/a", "unknown")
MANIFEST_COLUMNS = ("path", "label", "split", "patient_id")  # never covariates
MAX_LEVELS = 200  # a categorical covariate with more levels than this (and than half its rows) is an identifier
AGE_RANGE = (0.0, 130.0)


def parse_columns(specs: Iterable[str]) -> list[tuple[str, Kind | None]]:
    """``["age:num", "sex"]`` -> ``[("age", "num"), ("sex", None)]`` (names lower-cased, as manifest columns are)."""
    out: list[tuple[str, Kind | None]] = []
    for spec in specs:
        for part in str(spec).split(","):
            name, _, kind = part.strip().partition(":")
            name, kind = name.strip().lower(), kind.strip().lower()
            if not name:
                continue
            if kind not in ("", "num", "cat"):
                raise ConfigError(f"covariate '{part.strip()}': the type after ':' must be num or cat, not '{kind}'")
            if any(n == name for n, _ in out):
                raise ConfigError(f"covariate '{name}' is named twice")
            out.append((name, kind or None))  # type: ignore[arg-type]
    return out


def is_missing_token(text: str, missing: Sequence[str]) -> bool:
    return text.strip().lower() in missing


@dataclass
class CovariateTable:
    """Raw (typed, not yet encoded) covariates of N images.

    ``numeric``: (N, P) float64, NaN where missing; ``categorical``: (N, Q) object (str, None where missing).
    ``blocks`` maps each column to its block (a manifest column's block is itself; a joined table's
    columns share the table's block). ``absent`` marks rows whose joined-table block is missing because
    the key matched no row of that table.
    """

    numeric_names: list[str]
    numeric: np.ndarray
    categorical_names: list[str]
    categorical: np.ndarray
    blocks: dict[str, str]
    sources: dict[str, str] = field(default_factory=dict)  # block -> where it was read (file name)

    def __len__(self) -> int:
        return int(self.numeric.shape[0])

    @property
    def names(self) -> list[str]:
        return self.numeric_names + self.categorical_names

    def take(self, rows: Sequence[int] | np.ndarray) -> CovariateTable:
        idx = np.asarray(rows, dtype=np.int64)
        return CovariateTable(self.numeric_names, self.numeric[idx], self.categorical_names, self.categorical[idx],
                              self.blocks, self.sources)

    @staticmethod
    def concat(parts: list[CovariateTable]) -> CovariateTable:
        first = parts[0]
        return CovariateTable(first.numeric_names, np.concatenate([p.numeric for p in parts]), first.categorical_names,
                              np.concatenate([p.categorical for p in parts]), first.blocks, first.sources)

    def missing_mask(self) -> dict[str, np.ndarray]:
        """Per column, (N,) bool: where the value is missing."""
        out = {n: np.isnan(self.numeric[:, j]) for j, n in enumerate(self.numeric_names)}
        out.update({n: np.array([v is None for v in self.categorical[:, j]], dtype=bool)
                    for j, n in enumerate(self.categorical_names)})
        return out

    def without(self, blocks: Iterable[str], rows: np.ndarray | None = None) -> CovariateTable:
        """A copy with the columns of ``blocks`` set to missing (in ``rows`` only, a bool mask, if given)."""
        drop = set(blocks)
        numeric, categorical = self.numeric.copy(), self.categorical.copy()
        where = np.ones(len(self), dtype=bool) if rows is None else rows
        for j, n in enumerate(self.numeric_names):
            if self.blocks[n] in drop:
                numeric[where, j] = np.nan
        for j, n in enumerate(self.categorical_names):
            if self.blocks[n] in drop:
                categorical[where, j] = None
        return CovariateTable(self.numeric_names, numeric, self.categorical_names, categorical, self.blocks, self.sources)

    @property
    def block_names(self) -> list[str]:
        return list(dict.fromkeys(self.blocks[n] for n in self.names))


@dataclass
class _Column:
    name: str
    values: list[str]  # raw text, one per row
    lines: list[int]  # the file line of each row, for messages
    file: str


def type_column(col: _Column, forced: Kind | None, missing: Sequence[str]) -> tuple[Kind, np.ndarray]:
    """Decide a column's type and parse it: ("num", float64 with NaN) or ("cat", object with None).

    Raises DataError naming file, line and column for text in a numeric column (forced, or a column
    that is numbers but for a few values, which are typos far more often than categories), infinite
    numbers, and ages outside 0-130."""
    present = [(i, v.strip()) for i, v in enumerate(col.values) if not is_missing_token(v, missing)]
    parsed: dict[int, float] = {}
    bad: list[tuple[int, str]] = []
    for i, text in present:
        try:
            parsed[i] = float(text)
        except ValueError:
            bad.append((i, text))
    numeric_like = present and (not bad or (len(bad) <= max(3, 0.02 * len(present)) and len(parsed) >= 10))
    kind: Kind = forced or ("num" if numeric_like else "cat")
    if kind == "cat":
        values = np.empty(len(col.values), dtype=object)
        for i, text in present:
            values[i] = text
        return kind, values
    if bad:
        shown = "; ".join(f"line {col.lines[i]}: '{_short(t)}'" for i, t in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        hint = "" if forced else f", or force the type with {col.name}:cat if it is a category"
        raise DataError(f"{col.file}, column {col.name}: not a number at {shown}{more}; correct these values or leave them "
                        f"empty (missing){hint}")
    values = np.full(len(col.values), np.nan)
    for i, v in parsed.items():
        if not math.isfinite(v):
            raise DataError(f"{col.file}, line {col.lines[i]}, column {col.name}: '{col.values[i].strip()}' is not a finite "
                            "number; leave it empty if it is missing")
        values[i] = v
    if _is_age(col.name):
        lo, hi = AGE_RANGE
        wrong = [i for i, v in parsed.items() if not lo <= v <= hi]
        if wrong:
            shown = "; ".join(f"line {col.lines[i]}: {col.values[i].strip()}" for i in wrong[:5])
            raise DataError(f"{col.file}, column {col.name}: an age must be between {lo:g} and {hi:g} years, not {shown}"
                            f"{f' (and {len(wrong) - 5} more)' if len(wrong) > 5 else ''}")
    return kind, values


def _is_age(name: str) -> bool:
    return name == "age" or name.startswith("age_") or name.endswith("_age")


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_levels(name: str, kind: Kind, values: np.ndarray, file: str) -> None:
    if kind != "cat":
        return
    present = [v for v in values if v is not None]
    levels = len(set(present))
    if levels > MAX_LEVELS or (levels > 20 and levels > 0.5 * len(present)):
        raise DataError(f"{file}, column {name}: {levels} different values in {len(present)} rows; that is an identifier "
                        "or free text, not a covariate a model can learn from: leave it out (or force it numeric with "
                        f"{name}:num if it holds numbers)")


@dataclass
class TabularSpec:
    """Where covariates come from: manifest columns, and a table joined by a key."""

    columns: list[tuple[str, Kind | None]] = field(default_factory=list)
    tabular: Path | None = None
    join: str = "patient_id"
    tabular_columns: list[str] = field(default_factory=list)  # glob patterns; empty: every column but the key
    missing: tuple[str, ...] = DEFAULT_MISSING

    @property
    def block_name(self) -> str:
        return self.tabular.stem.lower() if self.tabular else ""


def read_covariates(rows: Sequence[Mapping[str, str]], lines: Sequence[int], keys: Sequence[str | None],
                    spec: TabularSpec, manifest: str) -> tuple[CovariateTable, dict]:
    """The covariates of ``rows`` (manifest rows as {column: text}, their file ``lines``, and their join
    ``keys``) as a :class:`CovariateTable`, and a summary of the join for data.json."""
    available = sorted({c for r in rows for c in r})
    num_cols: list[tuple[str, np.ndarray]] = []
    cat_cols: list[tuple[str, np.ndarray]] = []
    blocks: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name, forced in spec.columns:
        if name in MANIFEST_COLUMNS:
            raise ConfigError(f"'{name}' is a manifest column meddiag uses itself, not a covariate")
        if name not in available:
            raise ConfigError(f"covariate '{name}' is not a column of {manifest}; its columns: {', '.join(available) or 'none'}")
        col = _Column(name, [r.get(name, "") for r in rows], list(lines), manifest)
        kind, values = type_column(col, forced, spec.missing)
        if forced is None:  # a type the user forced is their call
            _check_levels(name, kind, values, manifest)
        (num_cols if kind == "num" else cat_cols).append((name, values))
        blocks[name], sources[name] = name, Path(manifest).name
    join: dict = {}
    if spec.tabular is not None:
        t_num, t_cat, join = _join_table(keys, spec, manifest, set(blocks))
        block = spec.block_name
        for name, values in t_num + t_cat:
            blocks[name] = block
        sources[block] = spec.tabular.name
        num_cols += t_num
        cat_cols += t_cat
    n = len(rows)
    numeric = np.stack([v for _, v in num_cols], axis=1) if num_cols else np.zeros((n, 0))
    categorical = np.stack([v for _, v in cat_cols], axis=1) if cat_cols else np.empty((n, 0), dtype=object)
    table = CovariateTable([c for c, _ in num_cols], numeric, [c for c, _ in cat_cols], categorical, blocks, sources)
    return table, join


def _join_table(keys: Sequence[str | None], spec: TabularSpec, manifest: str, taken: set[str]
                ) -> tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]], dict]:
    path = spec.tabular
    assert path is not None
    if not path.is_file():
        raise DataError(f"tabular file {path} does not exist")
    header, body, body_lines = read_csv(path)
    header = [h.strip().lower() for h in header]
    if spec.join not in header:
        raise DataError(f"{path} has no column '{spec.join}' to join on; its first columns: {', '.join(header[:10])}")
    key_at = header.index(spec.join)
    wanted = [i for i, h in enumerate(header) if i != key_at and (not spec.tabular_columns or any(
        fnmatch.fnmatchcase(h, p.lower()) for p in spec.tabular_columns))]
    if not wanted:
        raise ConfigError(f"no column of {path} matches --tabular-columns {','.join(spec.tabular_columns)}")
    clash = sorted(taken & {header[i] for i in wanted})
    if clash:
        raise ConfigError(f"{path} and {manifest} both have the covariate column(s) {', '.join(clash)}; rename one")
    row_of: dict[str, int] = {}
    for i, (line, row) in enumerate(zip(body_lines, body)):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} fields, but the header has {len(header)}")
        key = row[key_at].strip()
        if not key:
            raise DataError(f"{path}, line {line}: empty {spec.join}")
        if key in row_of:
            raise DataError(f"{path}, line {line}: {spec.join} '{key}' already appears on line {body_lines[row_of[key]]}; "
                            "one row per key")
        row_of[key] = i
    matched = [row_of.get(k) if k is not None else None for k in keys]
    hits = sum(m is not None for m in matched)
    if not hits:
        example = next((k for k in keys if k), "none")
        raise DataError(f"no {spec.join} of {manifest} (e.g. '{example}') appears in {path} (e.g. "
                        f"'{next(iter(row_of), 'none')}'): check the --join column and how keys are written")
    used = {m for m in matched if m is not None}
    lines = [body_lines[m] if m is not None else 0 for m in matched]
    num_cols: list[tuple[str, np.ndarray]] = []
    cat_cols: list[tuple[str, np.ndarray]] = []
    for i in wanted:
        name = header[i]
        text = [body[m][i] if m is not None else "" for m in matched]
        kind, values = _fast_numeric(text, spec.missing)
        if kind is None:  # not all numbers: the full checks, with line numbers
            kind, values = type_column(_Column(name, text, lines, str(path)), None, spec.missing)
            _check_levels(name, kind, values, str(path))
        (num_cols if kind == "num" else cat_cols).append((name, values))
    summary = {"file": str(path), "join": spec.join, "columns": len(wanted), "images_matched": hits,
               "images_absent": len(keys) - hits, "table_rows": len(row_of), "table_rows_unused": len(row_of) - len(used)}
    if len(row_of) - len(used):
        warnings.warn(f"{len(row_of) - len(used)} of the {len(row_of)} rows of {path.name} match no image of "
                      f"{Path(manifest).name}", stacklevel=3)
    return num_cols, cat_cols, summary


def _fast_numeric(text: list[str], missing: Sequence[str]) -> tuple[Kind | None, np.ndarray]:
    """A wide table's column parsed in one numpy call when it is all numbers (the common case)."""
    cleaned = ["nan" if is_missing_token(t, missing) else t for t in text]
    try:
        values = np.asarray(cleaned, dtype=np.float64)
    except ValueError:
        return None, np.empty(0)
    if not np.isfinite(values[~np.isnan(values)]).all():
        return None, np.empty(0)  # let the full check name the infinite value
    return "num", values


class NumericStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    block: str
    mean: float
    std: float
    median: float
    missing_rate: float


class CategoricalStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    block: str
    levels: list[str]
    missing_rate: float


class CovariateSchema(BaseModel):
    """What a model knows about its covariates, fitted on the training split: the encoding of new patients.

    Encoded layout, (N, F) float32: per numeric column its standardised value (the training median where
    missing) and a missing indicator; per categorical column one indicator per training level and one
    for "missing" (unseen values count as missing).
    """

    model_config = ConfigDict(extra="forbid")
    numeric: list[NumericStats] = Field(default_factory=list)
    categorical: list[CategoricalStats] = Field(default_factory=list)
    missing_values: list[str] = Field(default_factory=lambda: list(DEFAULT_MISSING))
    join: str | None = Field(None, description="the key of the joined table (its block: the table's columns)")
    tabular_block: str | None = None

    @classmethod
    def fit(cls, table: CovariateTable, missing: Sequence[str] = DEFAULT_MISSING, join: str | None = None,
            tabular_block: str | None = None) -> CovariateSchema:
        numeric = []
        for j, name in enumerate(table.numeric_names):
            v = table.numeric[:, j]
            seen = v[~np.isnan(v)]
            if seen.size:
                mean, std, median = float(seen.mean()), float(seen.std()), float(np.median(seen))
            else:
                mean, std, median = 0.0, 1.0, 0.0
            numeric.append(NumericStats(name=name, block=table.blocks[name], mean=mean, std=std if std > 1e-12 else 1.0,
                                        median=median, missing_rate=float(1 - seen.size / max(1, v.size))))
        categorical = []
        for j, name in enumerate(table.categorical_names):
            v = [x for x in table.categorical[:, j] if x is not None]
            categorical.append(CategoricalStats(name=name, block=table.blocks[name], levels=sorted(set(v)),
                                                missing_rate=float(1 - len(v) / max(1, len(table)))))
        return cls(numeric=numeric, categorical=categorical, missing_values=list(missing), join=join,
                   tabular_block=tabular_block)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    @property
    def n_features(self) -> int:
        return 2 * len(self.numeric) + sum(len(c.levels) + 1 for c in self.categorical)

    @property
    def blocks(self) -> list[str]:
        return list(dict.fromkeys([c.block for c in self.numeric] + [c.block for c in self.categorical]))

    def block_features(self) -> dict[str, list[int]]:
        """Each block's feature indices in the encoded layout."""
        out: dict[str, list[int]] = {}
        blocks = dict(self.name_blocks())
        for name, index in self.column_features().items():
            out.setdefault(blocks[name], []).extend(index)
        return out

    def column_features(self) -> dict[str, list[int]]:
        """Each column's feature indices in the encoded layout."""
        out: dict[str, list[int]] = {}
        at = 0
        for c in self.numeric:
            out[c.name] = [at, at + 1]
            at += 2
        for cat in self.categorical:
            out[cat.name] = list(range(at, at + len(cat.levels) + 1))
            at += len(cat.levels) + 1
        return out

    def manifest_columns(self) -> list[str]:
        """The covariates a person enters one by one (the joined table's columns excluded)."""
        return [n for n, b in self.name_blocks() if b != self.tabular_block]

    def name_blocks(self) -> list[tuple[str, str]]:
        return [(c.name, c.block) for c in self.numeric] + [(c.name, c.block) for c in self.categorical]

    def kinds(self) -> dict[str, Kind]:
        return {**{c.name: "num" for c in self.numeric}, **{c.name: "cat" for c in self.categorical}}

    def missing_row(self) -> np.ndarray:
        """(F,) float32: the encoding of a patient with every covariate missing."""
        return self.encode(self.empty_table(1))[0]

    def empty_table(self, n: int) -> CovariateTable:
        """``n`` rows with every covariate missing."""
        cats = np.empty((n, len(self.categorical)), dtype=object)
        blocks = dict(self.name_blocks())
        return CovariateTable([c.name for c in self.numeric], np.full((n, len(self.numeric)), np.nan),
                              [c.name for c in self.categorical], cats, blocks)

    def encode(self, table: CovariateTable, warn: str | None = None) -> np.ndarray:
        """(N, F) float32 features of ``table`` (columns found by name; absent columns are missing).
        ``warn``: name the source in a warning for each categorical value unseen in training."""
        n = len(table)
        parts: list[np.ndarray] = []
        num_at = {name: j for j, name in enumerate(table.numeric_names)}
        for c in self.numeric:
            v = table.numeric[:, num_at[c.name]] if c.name in num_at else np.full(n, np.nan)
            miss = np.isnan(v)
            z = (np.where(miss, c.median, v) - c.mean) / c.std
            parts += [z[:, None], miss[:, None].astype(np.float64)]
        cat_at = {name: j for j, name in enumerate(table.categorical_names)}
        for cat in self.categorical:
            v = table.categorical[:, cat_at[cat.name]] if cat.name in cat_at else np.full(n, None, dtype=object)
            index = {lvl: k for k, lvl in enumerate(cat.levels)}
            onehot = np.zeros((n, len(cat.levels) + 1))
            unseen: set[str] = set()
            for i, x in enumerate(v):
                k = index.get(x) if x is not None else None
                if k is None and x is not None:
                    unseen.add(str(x))
                onehot[i, len(cat.levels) if k is None else k] = 1.0
            if unseen and warn:
                warnings.warn(f"{warn}: {cat.name} value(s) {', '.join(sorted(unseen)[:5])} never seen in training; "
                              f"treated as missing (known: {', '.join(cat.levels[:10])})", stacklevel=2)
            parts.append(onehot)
        if not parts:
            return np.zeros((n, 0), dtype=np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def table_from_records(self, records: Sequence[Mapping[str, object]], where: str = "input",
                           lines: Sequence[int] | None = None) -> CovariateTable:
        """Covariates of new patients from {column: value} mappings (a CSV's rows, a form, JSON); any column
        may be absent or missing. Numbers are checked as in training; DataError names ``where`` and the
        line (``lines``: each record's line in ``where``; default 1, 2, ...)."""
        n = len(records)
        lines = list(lines) if lines is not None else [i + 1 for i in range(n)]
        numeric = np.full((n, len(self.numeric)), np.nan)
        for j, c in enumerate(self.numeric):
            text = [_text(r.get(c.name)) for r in records]
            col = _Column(c.name, text, lines, where)
            _, values = type_column(col, "num", self.missing_values)
            numeric[:, j] = values
        categorical = np.empty((n, len(self.categorical)), dtype=object)
        for j, cat in enumerate(self.categorical):
            for i, r in enumerate(records):
                text = _text(r.get(cat.name))
                categorical[i, j] = None if is_missing_token(text, self.missing_values) else text.strip()
        return CovariateTable([c.name for c in self.numeric], numeric, [c.name for c in self.categorical], categorical,
                              dict(self.name_blocks()))


    def missing_names(self, table: CovariateTable) -> list[list[str]]:
        """Per row, the covariates it lacks, or has with a value unseen in training (a joined table's
        block counts as one name)."""
        masks = table.missing_mask()
        for j, cat in enumerate(self.categorical):  # a value never seen in training reads as missing too
            if cat.name in table.categorical_names:
                known = set(cat.levels)
                column = table.categorical[:, table.categorical_names.index(cat.name)]
                masks[cat.name] = np.array([v is None or v not in known for v in column], dtype=bool)
        blocks = dict(self.name_blocks())
        out: list[list[str]] = []
        for i in range(len(table)):
            names: list[str] = []
            for name in self.names:
                label = blocks[name] if blocks[name] == self.tabular_block else name
                if masks[name][i] if name in masks else True:
                    if label not in names:
                        names.append(label)
            out.append(names)
        return out


class PatientData:
    """Covariates of new cases, found by image path: the rows of a CSV with a ``path`` column (matched to
    an image by the path as given, its absolute form, or a file name no other row shares), and optionally
    a joined table (``tabular``, by ``join``, as in training). Images without a row have every covariate
    missing, which every model with covariates accepts."""

    def __init__(self, rows: list[dict[str, str]], lines: list[int], source: str,
                 tabular: dict[str, dict[str, str]] | None = None, tabular_source: str = "", join: str | None = None) -> None:
        self.rows, self.lines, self.source = rows, lines, source
        self.tabular, self.tabular_source, self.join = tabular, tabular_source, join
        self._by_path: dict[str, int] = {}
        names: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            text = (row.get("path") or "").strip()
            if not text:
                continue
            for key in {text, str(Path(text).expanduser().resolve())}:
                if key in self._by_path and self._by_path[key] != i:
                    raise DataError(f"{source}, line {lines[i]}: the image {text} already has a row (line {lines[self._by_path[key]]})")
                self._by_path[key] = i
            names.setdefault(Path(text).name, []).append(i)
        self._by_name = {n: ix[0] for n, ix in names.items() if len(ix) == 1}
        self.used: set[int] = set()
        self.only: int | None = None  # one case's data, for whichever image comes with it
        self._warned = False

    @classmethod
    def from_csv(cls, path: str | Path, tabular: str | Path | None = None, join: str | None = None) -> PatientData:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"covariate file {path} does not exist")
        header, raw, lines = read_csv_dicts(path)
        if "path" not in [f.strip().lower() for f in header]:
            raise DataError(f"{path} needs a 'path' column naming each image (its other columns are covariates)")
        rows = [{k.strip().lower(): v for k, v in row.items()} for row in raw]
        table = None
        if tabular is not None:
            tabular = Path(tabular)
            if not join:
                raise DataError("this model has no joined table; --tabular does not apply")
            table = _keyed_rows(tabular, join)
        return cls(rows, lines, str(path), table, str(tabular or ""), join)

    @classmethod
    def single(cls, values: Mapping[str, object], source: str = "the request") -> PatientData:
        """One case's covariates (a form, a JSON object), for whichever image comes with them."""
        row = {str(k).strip().lower(): _text(v) for k, v in values.items()}
        data = cls([row], [1], source)
        data.only = 0
        return data

    def row_index(self, image: str | Path) -> int | None:
        if self.only is not None:
            return self.only
        text = str(image)
        for key in (text, str(Path(text).expanduser().resolve())):
            if key in self._by_path:
                return self._by_path[key]
        return self._by_name.get(Path(text).name)

    def table_for(self, schema: CovariateSchema, image: str | Path) -> CovariateTable:
        """The covariates of ``image`` (all missing when it has no row); DataError names the file, line and column."""
        i = self.row_index(image)
        row: dict[str, object] = dict(self.rows[i]) if i is not None else {}
        line = self.lines[i] if i is not None else 0
        if i is not None:
            self.used.add(i)
        if self.tabular is not None and self.join:
            key = (row.get(self.join) or "") if self.join != "path" else str(image)
            extra = self.tabular.get(str(key).strip())
            if extra:
                row = {**extra, **row}
        unknown = sorted(set(row) - set(schema.names) - {"path", "label", "split", "patient_id", self.join or ""})
        if unknown and not self._warned:
            self._warned = True
            warnings.warn(f"{self.source}: column(s) {', '.join(unknown[:10])} are not covariates of this model; ignored",
                          stacklevel=2)
        return schema.table_from_records([row], self.source, [line])

    def unused_rows(self) -> list[str]:
        """The paths of rows no predicted image matched (a typo in a path loses that case's data)."""
        return [self.rows[i].get("path", "") for i in range(len(self.rows)) if i not in self.used]


def _keyed_rows(path: Path, join: str) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise DataError(f"tabular file {path} does not exist")
    _, raw, _ = read_csv_dicts(path)
    rows = [{k.strip().lower(): v for k, v in row.items()} for row in raw]
    if rows and join not in rows[0]:
        raise DataError(f"{path} has no column '{join}' to join on")
    return {r[join].strip(): r for r in rows if r.get(join, "").strip()}


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def missing_summary(splits: Mapping[str, tuple[CovariateTable, list[str]]], list_rows: int = 50) -> dict:
    """For data.json: per column its type, block and missing rate per split, and the images missing it
    (the first ``list_rows`` paths per split; a joined table's block is summarised once, not per column)."""
    first = next(iter(splits.values()))[0]
    kinds = {**{n: "num" for n in first.numeric_names}, **{n: "cat" for n in first.categorical_names}}
    columns: dict[str, dict] = {}
    masks = {split: table.missing_mask() for split, (table, _) in splits.items()}
    for name in first.names:
        entry: dict = {"type": kinds[name], "block": first.blocks[name], "missing_rate": {}, "missing_images": {}}
        for split, (table, paths) in splits.items():
            mask = masks[split][name]
            entry["missing_rate"][split] = round(float(mask.mean()), 4) if len(mask) else 0.0
            if first.blocks[name] == name:
                entry["missing_images"][split] = [paths[i] for i in np.flatnonzero(mask)[:list_rows]]
        if not entry["missing_images"]:
            del entry["missing_images"]
        columns[name] = entry
    for block in {first.blocks[n] for n in first.names} - set(first.names):  # a joined table: the images it lacks
        entry = {"type": "table", "columns": sum(first.blocks[n] == block for n in first.names), "absent_rate": {},
                 "absent_images": {}}
        for split, (table, paths) in splits.items():
            absent = np.logical_and.reduce([masks[split][n] for n in table.names if table.blocks[n] == block])
            entry["absent_rate"][split] = round(float(absent.mean()), 4) if len(absent) else 0.0
            entry["absent_images"][split] = [paths[i] for i in np.flatnonzero(absent)[:list_rows]]
        columns[block] = entry
    return columns
