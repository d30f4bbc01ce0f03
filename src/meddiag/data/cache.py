"""The prepared-image cache: every file decoded and prepared once, kept on disk for every later run.

A training run spends much of its start decoding files (a JPEG or DICOM read, windowed, resized to the
model's input). The cache keeps each file's result — the uint8 array ``to_model_input`` /
``volume_to_model_input`` made — keyed by

- the file's identity: its resolved path, size and modification time (for a DICOM series folder, those of
  every file in it), so a changed or replaced file is decoded again and its old entry is never used;
- the preparation: 2D or 3D, input size, fit, window, volume index, and :data:`PREPARATION_VERSION`
  (raised whenever the preparing code changes what it makes).

Layout under ``$MEDDIAG_CACHE/prepared`` (default ``~/.cache/meddiag/prepared``)::

    index.sqlite                       entries: (preparation, identity) -> shard, slot, shape, CRC-32, metadata
    <preparation>/<C>x<shape>.u8       a shard: equal-sized slots of raw uint8, one prepared array each
                                       (a numpy array of shape (slots, C, *shape) on disk, np.memmap can map it)

Writes are safe against a kill and against other processes writing the same cache: slots are allocated in
an SQLite transaction, the data is written and flushed to disk, and only then is the entry recorded. A
killed write leaves unused bytes, never an entry that points at them. Every entry carries the CRC-32 of
its bytes; an entry whose bytes no longer match (a damaged disk, a truncated shard) is treated as absent:
the file is decoded again and the entry rewritten, never trained on.

Reads use ``os.pread`` (not a memory map), so what a process holds resident does not grow with the data
set: the operating system's page cache keeps hot shards in memory without counting them against a run.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiag.errors import DataError

PREPARATION_VERSION = 1  # raise when to_model_input / volume_to_model_input change what they make
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    preparation TEXT NOT NULL, identity TEXT NOT NULL, shard TEXT NOT NULL, slot INTEGER NOT NULL,
    shape TEXT NOT NULL, crc INTEGER NOT NULL, meta TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (preparation, identity));
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, slot_bytes INTEGER NOT NULL, slots INTEGER NOT NULL);
"""


def cache_root() -> Path:
    """Where meddiag keeps what it fetched or made once: ``$MEDDIAG_CACHE``, default ``~/.cache/meddiag``."""
    return Path(os.environ.get("MEDDIAG_CACHE") or Path.home() / ".cache" / "meddiag")


@dataclass(frozen=True)
class Preparation:
    """How files become model input, besides the files themselves: what an entry's key says."""

    volume: bool
    size: int
    fit: str
    window: str | None
    volume_index: int | None

    @property
    def key(self) -> str:
        """A folder-safe name, e.g. ``v1-image-128-pad-own``."""
        parts = [f"v{PREPARATION_VERSION}", "volume" if self.volume else "image", str(self.size), self.fit,
                 self.window or "own"] + ([f"vol{self.volume_index}"] if self.volume_index is not None else [])
        return re.sub(r"[^A-Za-z0-9_.,+-]", "_", "-".join(parts))


def file_identity(path: str | Path) -> str:
    """The resolved path with size and modification time (ns); a folder (a DICOM series) with those of
    every file in it. Raises OSError when the path cannot be read."""
    path = Path(path).resolve()
    if path.is_dir():
        stats = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
        digest = zlib.crc32(repr(stats).encode()) & 0xFFFFFFFF
        return f"{path}|dir|{len(stats)}|{digest:08x}"
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


@dataclass(frozen=True)
class Entry:
    """Where one prepared array lies: shard file, slot, shape, CRC-32 of its bytes, and what reading the file
    also told (DICOM modality, body part, a one-way patient key)."""

    shard: Path
    slot: int
    shape: tuple[int, ...]
    crc: int
    meta: dict

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


class EntryDamaged(DataError):
    """A cache entry whose bytes no longer match its checksum."""


class PreparedCache:
    """The on-disk store of prepared arrays (see the module's docstring). Safe to share between threads
    (one SQLite connection each) and processes (SQLite's locking)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root() / "prepared"
        self.root.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.root / "index.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    # -- looking up ---------------------------------------------------------------------------------------

    def lookup(self, preparation: Preparation, identities: Iterable[str]) -> dict[str, Entry]:
        """The entries held for ``identities`` under ``preparation`` (absent ones are left out)."""
        wanted = list(identities)
        found: dict[str, Entry] = {}
        db = self._db()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            rows = db.execute(f"SELECT identity, shard, slot, shape, crc, meta FROM entries WHERE preparation = ? AND identity IN "
                              f"({','.join('?' * len(chunk))})", [preparation.key, *chunk]).fetchall()
            for identity, shard, slot, shape, crc, meta in rows:
                found[identity] = Entry(self.root / shard, int(slot), tuple(json.loads(shape)), int(crc), json.loads(meta))
        return found

    def read(self, entry: Entry, verify: bool = True) -> np.ndarray:
        """The prepared array of ``entry``; :class:`EntryDamaged` if its bytes are short or fail their CRC-32."""
        fd = self._fd(entry.shard)
        data = os.pread(fd, entry.nbytes, entry.slot * entry.nbytes)
        if len(data) != entry.nbytes or (verify and zlib.crc32(data) & 0xFFFFFFFF != entry.crc):
            raise EntryDamaged(f"cache entry {entry.shard.name}#{entry.slot} is damaged (its bytes fail their checksum)")
        return np.frombuffer(data, dtype=np.uint8).reshape(entry.shape)

    def read_into(self, entry: Entry, out: np.ndarray) -> None:
        """Read ``entry`` into the uint8 buffer ``out`` (its shape), without checking its CRC (see :meth:`read`)."""
        fd = self._fd(entry.shard)
        view = memoryview(out.reshape(-1))
        if os.preadv(fd, [view], entry.slot * entry.nbytes) != entry.nbytes:
            raise EntryDamaged(f"cache entry {entry.shard.name}#{entry.slot} is damaged (its shard is shorter than it)")

    def _fd(self, shard: Path) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(shard, os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    # -- storing ------------------------------------------------------------------------------------------

    def store(self, preparation: Preparation, items: list[tuple[str, np.ndarray, dict]]) -> dict[str, Entry]:
        """Keep each (identity, uint8 array, metadata) of ``items``; returns their entries. Arrays of one
        shape share a shard. The data is on disk before any entry names it."""
        by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray, dict]]] = {}
        for item in items:
            by_shape.setdefault(tuple(item[1].shape), []).append(item)
        out: dict[str, Entry] = {}
        for shape, group in by_shape.items():
            out.update(self._store_group(preparation, shape, group))
        return out

    def _store_group(self, preparation: Preparation, shape: tuple[int, ...], group: list[tuple[str, np.ndarray, dict]]) -> dict[str, Entry]:
        name = f"{preparation.key}/{'x'.join(map(str, shape))}.u8"
        slot_bytes = int(np.prod(shape))
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT slots FROM shards WHERE name = ?", (name,)).fetchone()
            first = int(row[0]) if row else 0
            if row:
                db.execute("UPDATE shards SET slots = ? WHERE name = ?", (first + len(group), name))
            else:
                db.execute("INSERT INTO shards VALUES (?, ?, ?)", (name, slot_bytes, len(group)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for k, (_, array, _) in enumerate(group):
                data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
                os.pwrite(fd, data, (first + k) * slot_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        now = time.time()
        rows, out = [], {}
        for k, (identity, array, meta) in enumerate(group):
            crc = zlib.crc32(np.ascontiguousarray(array, dtype=np.uint8).tobytes()) & 0xFFFFFFFF
            rows.append((preparation.key, identity, name, first + k, json.dumps(list(shape)), crc, json.dumps(meta), now))
            out[identity] = Entry(path, first + k, shape, crc, meta)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return out

    def forget(self, preparation: Preparation, identities: Iterable[str]) -> None:
        """Drop the entries of ``identities`` (damaged ones, before they are rebuilt)."""
        db = self._db()
        db.executemany("DELETE FROM entries WHERE preparation = ? AND identity = ?", [(preparation.key, i) for i in identities])

    # -- meddiag cache info / clear -----------------------------------------------------------------------

    def info(self) -> dict:
        """Per preparation: the files held and the bytes they take; the shards' size on disk (with slots no
        entry names any more: files that changed, entries rewritten) in all."""
        rows = self._db().execute("SELECT e.preparation, COUNT(*), SUM(s.slot_bytes) FROM entries e JOIN shards s ON e.shard = s.name "
                                  "GROUP BY e.preparation").fetchall()
        held = {p: {"entries": int(n), "bytes": int(b or 0)} for p, n, b in rows}
        on_disk = sum(p.stat().st_size for p in self.root.rglob("*.u8"))
        return {"root": str(self.root), "preparations": held, "entries": sum(h["entries"] for h in held.values()),
                "bytes_held": sum(h["bytes"] for h in held.values()), "bytes_on_disk": on_disk}

    def clear(self) -> int:
        """Remove every entry and shard; returns the bytes freed."""
        freed = sum(p.stat().st_size for p in self.root.rglob("*.u8"))
        self.close()
        for p in sorted(self.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if p.is_file() or p.is_symlink():
                p.unlink()
            elif p.is_dir():
                p.rmdir()
        with self._db() as db:
            db.executescript(_SCHEMA)
        return freed

    def __getstate__(self) -> dict:
        """For loader worker processes: the folder travels; connections and open files are made anew there."""
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.root = state["root"]
        self._local = threading.local()
        self._fds = {}
        self._fd_lock = threading.Lock()

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def __del__(self) -> None:  # pragma: no cover - file descriptors of a cache dropped without close()
        try:
            with self._fd_lock:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_cache(setting: str | Path | None) -> PreparedCache | None:
    """The cache a ``cache`` setting names: ``auto`` (``$MEDDIAG_CACHE/prepared``), ``off`` (none), or a folder.
    A folder that cannot be made or written gives a warning and no cache: decoding still works."""
    import warnings

    if setting is None or str(setting).strip().lower() in ("off", "none", "no", "false", ""):
        return None
    root = None if str(setting).strip().lower() == "auto" else Path(setting).expanduser()
    try:
        return PreparedCache(root)
    except (OSError, sqlite3.Error) as exc:
        where = root or cache_root() / "prepared"
        warnings.warn(f"the prepared-image cache {where} cannot be used ({exc.__class__.__name__}: {exc}); "
                      "every file is decoded without it (--cache DIR chooses another folder, --cache off silences this)",
                      stacklevel=2)
        return None


class DiskImages:
    """uint8 images (N, C, *spatial) lying in the prepared-image cache, read when indexed: what a split holds
    when its images do not fit in memory. It answers what meddiag asks of a split's image tensor — ``len``,
    ``shape``, ``dtype``, an image by position, a slice or an index (a tensor, list or array) as a uint8
    tensor — reading only what is asked for, so memory does not grow with the data set.

    ``channels``: what every image is given as (grayscale repeated to 3 channels beside colour images).
    ``repair(i)``: decode image ``i``'s file again and return its array, for an entry whose bytes fail their
    checksum (each entry is checked the first time this process reads it); None: such an entry is an error."""

    def __init__(self, cache: PreparedCache, entries: list[Entry], channels: int, spatial: tuple[int, ...],
                 repair: Callable[[int], np.ndarray] | None = None, sources: list[str] | None = None) -> None:
        import torch

        self.cache, self.entries, self.channels, self.spatial = cache, list(entries), channels, tuple(spatial)
        self.repair, self.sources = repair, sources
        self.dtype = torch.uint8
        self._checked = np.zeros(len(self.entries), dtype=bool)

    @property
    def shape(self):  # noqa: ANN201 - torch.Size
        import torch

        return torch.Size((len(self.entries), self.channels, *self.spatial))

    @property
    def ndim(self) -> int:
        return 2 + len(self.spatial)

    def __len__(self) -> int:
        return len(self.entries)

    def numel(self) -> int:
        return len(self.entries) * self.channels * int(np.prod(self.spatial))

    def _one(self, i: int, out: np.ndarray) -> None:
        """Image ``i`` into ``out`` (channels, *spatial)."""
        entry = self.entries[i]
        have = entry.shape[0]
        target = out if have == self.channels else np.empty(entry.shape, dtype=np.uint8)
        if self._checked[i]:
            self.cache.read_into(entry, target)
        else:
            try:
                target[...] = self.cache.read(entry)
            except EntryDamaged:
                if self.repair is None:
                    where = self.sources[i] if self.sources else f"image {i}"
                    raise EntryDamaged(f"{where}: its prepared copy in the cache is damaged; run 'meddiag cache clear' "
                                       "and start again (the file is then decoded anew)") from None
                fresh = self.repair(i)
                target[...] = fresh
            self._checked[i] = True
        if target is not out:  # gray among colour images repeated, colour for a gray model as luminance
            if have == 1:
                out[...] = np.repeat(target, self.channels, axis=0)
            else:
                from meddiag.data.channels import luminance

                out[...] = luminance(target)

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int, slice, tensor, list or array -> torch.Tensor
        import torch

        if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            i = int(index)
            i = i + len(self) if i < 0 else i
            out = np.empty((self.channels, *self.spatial), dtype=np.uint8)
            self._one(i, out)
            return torch.from_numpy(out)
        rows = self._rows(index)
        out = np.empty((len(rows), self.channels, *self.spatial), dtype=np.uint8)
        for k, i in enumerate(rows):
            self._one(i, out[k])
        return torch.from_numpy(out)

    def _rows(self, index) -> list[int]:  # noqa: ANN001
        import torch

        if isinstance(index, slice):
            return list(range(*index.indices(len(self))))
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return [int(i) + len(self) if i < 0 else int(i) for i in rows.reshape(-1)]

    def take(self, index) -> DiskImages:  # noqa: ANN001
        """The images at ``index``, still on disk."""
        rows = self._rows(index)
        repair = _Reindexed(self.repair, rows) if self.repair else None
        taken = DiskImages(self.cache, [self.entries[i] for i in rows], self.channels, self.spatial, repair,
                           [self.sources[i] for i in rows] if self.sources else None)
        taken._checked = self._checked[rows] if rows else np.zeros(0, dtype=bool)
        return taken

    def with_channels(self, channels: int) -> DiskImages:
        """The same images given as ``channels`` channels (gray repeated, or colour as luminance)."""
        same = DiskImages(self.cache, self.entries, channels, self.spatial, self.repair, self.sources)
        same._checked = self._checked
        return same

    @staticmethod
    def concat(parts: list[DiskImages]) -> DiskImages:
        first = parts[0]
        repair = _Joined([(p.repair, len(p)) for p in parts])
        sources = [s for p in parts for s in p.sources] if all(p.sources for p in parts) else None
        joined = DiskImages(first.cache, [e for p in parts for e in p.entries], max(p.channels for p in parts), first.spatial,
                            repair, sources)
        joined._checked = np.concatenate([p._checked for p in parts])
        return joined


@dataclass
class _Reindexed:
    """A subset's ``repair``: its k-th image is the ``rows[k]``-th of the whole."""

    repair: Callable[[int], np.ndarray]
    rows: list[int]

    def __call__(self, k: int) -> np.ndarray:
        return self.repair(self.rows[k])


@dataclass
class _Joined:
    """A concatenation's ``repair``: each part's own, by position."""

    parts: list[tuple[Callable[[int], np.ndarray] | None, int]]

    def __call__(self, i: int) -> np.ndarray:
        for repair, n in self.parts:
            if i < n:
                if repair is None:
                    raise EntryDamaged("a prepared copy in the cache is damaged; run 'meddiag cache clear' and start again")
                return repair(i)
            i -= n
        raise IndexError(i)
