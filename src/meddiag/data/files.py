"""Turning a list of labelled image files into an in-memory :class:`ImageData`.

Shared by image folders and CSV manifests: files are decoded in parallel, files that
cannot be read are excluded by name (never silently), and missing splits are carved
out of the training files with a seeded stratified (and, given patient ids,
patient-grouped) split.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sqlite3
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from meddiag.data.cache import DiskImages, Entry, EntryDamaged, Preparation, PreparedCache, file_identity, open_cache
from meddiag.data.classes import positive_class_of, positive_last
from meddiag.data.covariates import CovariateTable
from meddiag.data.dataset import SPLITS, ImageData, Split
from meddiag.data.dicom import dicom_frame_count, is_dicom_file, patient_key, read_dicom, read_dicom_identity
from meddiag.data.images import Fit, dicom_as_2d, read_image, to_model_input
from meddiag.data.splits import stratification_key, stratified_split
from meddiag.data.volumes import is_nifti_file, read_volumes, volume_to_model_input
from meddiag.errors import ConfigError, DataError, failure_reason, source_failure

DEFAULT_FILE_IMAGE_SIZE = 128
DEFAULT_VOLUME_SIZE = 64


def is_volume_source(path: Path) -> bool:
    """A NIfTI file, a multi-frame DICOM file or a folder (a DICOM series) is a volume; anything
    else a 2D image. (DICOM files are told apart by their header's NumberOfFrames.)"""
    return path.is_dir() or is_nifti_file(path) or (is_dicom_file(path) and dicom_frame_count(path) > 1)


@dataclass
class FileRecord:
    path: Path
    label: str
    split: str | None = None
    patient_id: str | None = None
    meta: dict[str, str] = field(default_factory=dict)  # other manifest columns (sex, site, ...)
    targets: dict[str, float] | None = None  # multi-label: 1/0 per finding, NaN where not recorded
    line: int = 0  # the manifest line it came from (0: not from a manifest)
    covariate_row: int | None = None  # its row of the covariate table read with it
    modality: str = ""  # DICOM files: Modality and BodyPartExamined, as read (upper case; "" otherwise)
    body_part: str = ""


def load_file_records(
    records: list[FileRecord],
    name: str,
    *,
    image_size: int | None = None,
    fit: Fit = "pad",
    window: str | None = None,
    volume_index: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    progress: bool = True,
    positive_class: str | None = None,
    covariates: CovariateTable | None = None,
    cache: str | Path | None = "auto",
    memory_mb: float | None = None,
) -> ImageData:
    """Read labelled files into memory at ``image_size`` and split them.

    2D images default to 128 px; volumes (NIfTI files, multi-frame DICOM files, DICOM series
    folders) to 64^3 voxels. ``volume_index`` picks the volume of 4D NIfTI files.

    Records without a split are training files. When no record is in "val" (or "test"),
    that split is carved from the training files, keeping each patient's files together
    (patient ids from the manifest, or for DICOM files a one-way key of their PatientID). Unreadable files are listed in
    ``ImageData.excluded`` and a warning names each one. ``cache``: the prepared-image cache (see
    :func:`meddiag.data.cache.open_cache`): files prepared before are read from it, not decoded again.
    ``memory_mb``: when the prepared images would take more, the splits hold them as
    :class:`~meddiag.data.cache.DiskImages`, read from the cache as training uses them (None: in memory always).
    """
    multilabel = bool(records) and records[0].targets is not None
    class_names = list(records[0].targets) if multilabel else sorted({r.label for r in records})  # type: ignore[arg-type]
    if not multilabel:
        _check_classes(class_names, name)
    positive = None
    if len(class_names) == 2 and not multilabel:
        positive, _ = positive_class_of(class_names, positive_class, name)
        class_names = positive_last(class_names, positive)
    elif positive_class is not None:
        raise ConfigError(f"--positive-class applies to two-class tasks; {name} has {len(class_names)} "
                          f"{'findings' if multilabel else 'classes'}")
    read = _read_kept(records, name, image_size, fit, window, volume_index, progress, cache, memory_mb)
    kept, volume, size, excluded = read.items, read.volume, read.size, read.excluded
    spatial_dims = 3 if volume else 2
    channels = read.channels

    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, (rec, _) in enumerate(kept):
        by_split[rec.split or "train"].append(i)
    if multilabel:
        labels = np.array([[r.targets[c] for c in class_names] for r, _ in kept], dtype=np.float32)  # type: ignore[index]
    else:
        labels = np.array([class_names.index(r.label) for r, _ in kept])
    strata = stratification_key(labels)
    patients = [r.patient_id for r, _ in kept]
    has_patients = any(p is not None for p in patients)
    origin = {s: "given" for s in SPLITS if by_split[s]}
    n_train = len(by_split["train"])
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if by_split[split] or not by_split["train"]:
            continue
        pool = np.array(by_split["train"])
        groups = [patients[i] or f"#{i}" for i in pool] if has_patients else None
        # Fractions are of the original training files: carving test first must not shrink val's share.
        share = fraction * n_train / len(pool)
        keep, carve = stratified_split(strata[pool], min(share, 0.5), seed, groups)
        by_split["train"], by_split[split] = pool[keep].tolist(), pool[carve].tolist()
        origin[split] = "carved from train"

    meta_keys = sorted({k for r, _ in kept for k in r.meta})
    splits: dict[str, Split] = {}
    for split in SPLITS:
        idx = by_split[split]
        if not idx:
            raise DataError(f"{name}: the {split} split is empty; add images or use larger data")
        splits[split] = Split(
            images=read.images(idx),
            labels=torch.from_numpy(labels[idx] if multilabel else labels[idx].astype(np.int64)),
            paths=[str(kept[i][0].path) for i in idx],
            groups=[patient_key(patients[i]) if patients[i] else f"#{kept[i][0].path}" for i in idx] if has_patients else None,
            meta={k: [kept[i][0].meta.get(k, "") for i in idx] for k in meta_keys},
            covariates=covariates.take([kept[i][0].covariate_row for i in idx]) if covariates is not None else None,  # type: ignore[misc]
        )
    missing = [c for c, n in zip(class_names, splits["train"].class_counts(len(class_names))) if n == 0]
    if missing:
        raise DataError(f"{name}: no training images {'with the finding' if multilabel else 'of class'} {', '.join(missing)}")
    return ImageData(
        name=name,
        task="multilabel" if multilabel else "binary" if len(class_names) == 2 else "multiclass",
        class_names=class_names,
        splits=splits,
        image_size=size,
        in_channels=channels,
        spatial_dims=spatial_dims,
        split_origin=origin,
        excluded=excluded,
        positive_class=positive,
        acquisition={"modality": _counts(r.modality for r, _ in kept), "body_part": _counts(r.body_part for r, _ in kept)},
    )


@dataclass
class UnlabelledImages:
    """Images read without labels (self-supervised pretraining): uint8 (N, C, *spatial)."""

    name: str
    images: torch.Tensor
    paths: list[str] | None
    image_size: int
    spatial_dims: int
    excluded: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""  # what was read of the source (e.g. only its training split)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])


def read_unlabelled(records: list[FileRecord], name: str, *, image_size: int | None = None, fit: Fit = "pad",
                    window: str | None = None, volume_index: int | None = None, progress: bool = True,
                    cache: str | Path | None = "auto", memory_mb: float | None = None) -> UnlabelledImages:
    """Read files as :func:`load_file_records` does (one kind, in parallel, failures excluded by name and
    warned of, through the prepared-image cache), without labels or splits. Colour wins: grayscale images join
    colour ones as 3 channels."""
    read = _read_kept(records, name, image_size, fit, window, volume_index, progress, cache, memory_mb)
    return UnlabelledImages(name, read.images(list(range(len(read.items)))), [str(r.path) for r, _ in read.items], read.size,
                            3 if read.volume else 2, read.excluded)


@dataclass
class _Kept:
    """The files read: (record, array — or cache entry, for data sets kept on disk) of each, whether they are
    volumes, their size, (path, reason) of each excluded, and how to prepare a record again (or None)."""

    items: list[tuple[FileRecord, np.ndarray | Entry]]
    volume: bool
    size: int
    excluded: list[tuple[str, str]]
    cache: PreparedCache | None = None
    repair: Callable[[FileRecord], np.ndarray] | None = None

    @property
    def channels(self) -> int:
        """3 when any image is in colour (gray ones then join them as 3 channels), else 1."""
        return 3 if any(a.shape[0] == 3 for _, a in self.items) else 1

    def images(self, index: list[int]) -> torch.Tensor | DiskImages:
        """The images of ``index`` (positions in ``items``) as (N, C, *spatial) uint8: a tensor in memory, or
        :class:`DiskImages` read from the cache as they are used."""
        channels, chosen = self.channels, [self.items[i] for i in index]
        if chosen and self.cache is not None and all(isinstance(a, Entry) for _, a in chosen):
            records = [r for r, _ in chosen]
            repair = RecordRepair(self.repair, records) if self.repair else None
            spatial = (self.size,) * (3 if self.volume else 2)
            return DiskImages(self.cache, [a for _, a in chosen], channels, spatial, repair, [str(r.path) for r in records])  # type: ignore[misc]
        arrays = [self.cache.read(a) if isinstance(a, Entry) else a for _, a in chosen]  # type: ignore[union-attr]
        arrays = [np.repeat(a, 3, axis=0) if channels == 3 and a.shape[0] == 1 else a for a in arrays]
        return torch.from_numpy(np.stack(arrays))


def _read_kept(records: list[FileRecord], name: str, image_size: int | None, fit: Fit, window: str | None,
               volume_index: int | None, progress: bool, cache: str | Path | None = "auto", memory_mb: float | None = None,
               ) -> _Kept:
    """Read the records of one kind at ``image_size`` (default by kind), each excluded file warned of (see
    :class:`_Kept`). Prepared data larger than ``memory_mb`` stays in the cache (when there is one).
    :class:`DataError` when none could be read."""
    records, volume, excluded = _one_kind(records, name)
    size = image_size or (DEFAULT_VOLUME_SIZE if volume else DEFAULT_FILE_IMAGE_SIZE)
    store = open_cache(cache)
    arrays, unreadable, repair = _read_all(records, volume, size, fit, window, volume_index, progress, store, memory_mb)
    excluded += unreadable
    kept = [(r, a) for r, a in zip(records, arrays) if a is not None]
    if not kept:
        first = f"; the first failure: {excluded[0][0]}: {excluded[0][1]}" if excluded else ""
        raise DataError(f"none of the {len(records) + len(excluded) - len(unreadable)} files in {name} could be read{first}")
    for path, reason in excluded:
        warnings.warn(f"excluded {path}: {reason}", stacklevel=3)
    return _Kept(kept, volume, size, excluded, store, repair)


def _counts(values: Iterable[str]) -> dict[str, int]:
    """How many of each non-empty value."""
    out: dict[str, int] = {}
    for v in values:
        if v:
            out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def _check_classes(class_names: list[str], name: str) -> None:
    if len(class_names) < 2:
        found = f"only the class '{class_names[0]}'" if class_names else "no class"
        raise DataError(f"{name}: found {found}; a classifier needs images of at least 2 classes "
                        "(is the folder one level too high? it should hold one folder per class, or train/val/test)")


def _one_kind(records: list[FileRecord], name: str) -> tuple[list[FileRecord], bool, list[tuple[str, str]]]:
    """The records a model can take together: all 2D images or all volumes (headers read in parallel).

    Returns (records kept, whether they are volumes, excluded (path, reason)). A file whose header
    cannot be read (or contradicts its data) is excluded with its reason; a few files of the other
    kind among many of one are excluded by name; equal numbers of each are an error."""
    def kind(rec: FileRecord) -> bool | str:
        try:
            return is_volume_source(Path(rec.path))
        except Exception as exc:  # noqa: BLE001 - whatever one header raises is that file's reason
            return failure_reason(exc)

    with ThreadPoolExecutor(_workers()) as pool:
        kinds = list(pool.map(kind, records, chunksize=64))
    excluded = [(str(r.path), k) for r, k in zip(records, kinds) if isinstance(k, str)]
    n_volumes, n_images = sum(k is True for k in kinds), sum(k is False for k in kinds)
    if n_volumes and n_volumes == n_images:
        image = next(r.path for r, k in zip(records, kinds) if k is False)
        vol = next(r.path for r, k in zip(records, kinds) if k is True)
        raise DataError(f"{name} holds as many 2D images ({image}, ...) as volumes ({vol}, ...); a model takes one "
                        "or the other: put them in separate data sets")
    volume = n_volumes > n_images
    stray = "a volume among 2D images" if not volume else "a 2D image among volumes"
    excluded += [(str(r.path), f"{stray}; a model takes one or the other") for r, k in zip(records, kinds) if k is (not volume)]
    return [r for r, k in zip(records, kinds) if k is volume], volume, excluded


def _workers() -> int:
    return min(8, (os.cpu_count() or 1) * 2)


# A first pass over at least this many files decodes in processes (one per CPU), fewer in threads. Measured
# (benchmarks/data_scale.py decode, 2 CPUs): processes prepare 256 px PNGs 3.5x as fast as 8 threads (1953
# against 559 images/s) and 512 px DICOM 2.7x (289 against 106): decoding and resizing hold the GIL for much
# of their time. Starting the processes costs about 2 s (each imports torch), which threads beat below ~1,500.
PROCESS_MIN_FILES = 2000


def _decode_worker() -> None:
    torch.set_num_threads(1)  # one process per CPU: torch's own threads would only contend with the others


def _decode_pool(n_files: int, processes: bool = True) -> Executor:
    """Where a first pass over ``n_files`` decodes: processes for many files (unless ``processes`` is False), else threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes and n_files >= PROCESS_MIN_FILES and cpus > 1:
        # spawn: a fresh interpreter per worker, never a fork of this process's torch and SQLite state
        return ProcessPoolExecutor(min(cpus, 16), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_decode_worker)
    return ThreadPoolExecutor(_workers())


def _read_volume(rec: FileRecord, size: int, window: str | None, fit: Fit, volume_index: int | None) -> tuple[np.ndarray, dict] | str:
    """A volume record as (1, S, S, S) uint8 with what its files say (see :func:`_file_facts`), or the reason it cannot be used."""
    volumes = read_volumes(rec.path, volume_index)
    if len(volumes) != 1:
        return f"the folder holds {len(volumes)} DICOM series; put each series in a folder of its own"
    key = ""
    if volumes[0].sources and is_dicom_file(Path(volumes[0].sources[0])):
        key = read_dicom_identity(volumes[0].sources[0]).patient_key or ""
    facts = {"modality": volumes[0].modality.strip().upper(), "body_part": volumes[0].body_part, "patient_key": key}
    return volume_to_model_input(volumes[0], size, 1, window, fit), facts


def _file_facts(rec: FileRecord, facts: dict) -> None:
    """What reading a file told besides its pixels, onto its record: DICOM Modality and BodyPartExamined,
    and — where the record has no patient id of its own — the one-way key of its PatientID."""
    rec.modality, rec.body_part = facts.get("modality", ""), facts.get("body_part", "")
    rec.patient_id = rec.patient_id or facts.get("patient_key") or None


@dataclass
class Preparer:
    """Prepares one file as model input (decoded, windowed, resized: uint8 (C, S, S) or (1, S, S, S)); a plain
    object, so that images read from the cache can travel to loader processes with what repairs them."""

    volume: bool
    size: int
    fit: Fit
    window: str | None
    volume_index: int | None
    cache: PreparedCache | None = None

    def prepare(self, rec: FileRecord) -> tuple[np.ndarray, dict] | str:
        """(array, what the file said besides its pixels: see :func:`_file_facts`), or why it cannot be used."""
        try:
            if self.volume:
                return _read_volume(rec, self.size, self.window, self.fit, self.volume_index)
            facts: dict = {}
            if is_dicom_file(Path(rec.path)):
                image = read_dicom(rec.path, self.window)
                arr = dicom_as_2d(image, rec.path)
                facts = {"modality": image.identity.modality, "body_part": image.identity.body_part,
                         "patient_key": image.identity.patient_key or ""}
            else:
                arr = read_image(rec.path, self.window)
            return to_model_input(arr, self.size, 3 if arr.ndim == 3 else 1, self.fit), facts
        except Exception as exc:  # noqa: BLE001 - one file's failure, whatever raised it, excludes that file only
            return source_failure(exc, rec.path)

    def repair(self, rec: FileRecord) -> np.ndarray:
        """Prepare ``rec`` again (its cache entry was found damaged) and keep the new array in the cache."""
        res = self.prepare(rec)
        if isinstance(res, str):
            raise DataError(f"{rec.path}: its prepared copy in the cache is damaged and the file can no longer be read: {res}")
        identity = _identity(rec.path)
        if identity and self.cache is not None:
            _keep(self.cache, Preparation(self.volume, self.size, self.fit, self.window, self.volume_index),
                  [(identity, res[0], res[1])])
        return res[0]


@dataclass
class RecordRepair:
    """``repair(k)`` of :class:`~meddiag.data.cache.DiskImages`: prepare the file of the k-th of ``records`` again."""

    repair: Callable[[FileRecord], np.ndarray]
    records: list[FileRecord]

    def __call__(self, k: int) -> np.ndarray:
        return self.repair(self.records[k])


def _read_all(records: list[FileRecord], volume: bool, size: int, fit: Fit, window: str | None,
              volume_index: int | None, progress: bool, cache: PreparedCache | None = None, memory_mb: float | None = None,
              ) -> tuple[list[np.ndarray | Entry | None], list[tuple[str, str]], Callable[[FileRecord], np.ndarray] | None]:
    """Every file prepared at ``size``: from ``cache`` where it holds the file as it is now, else decoded and
    resized in parallel (and kept in ``cache``). Returns (for each record its array — or, when the prepared
    data would take more than ``memory_mb`` and the cache holds it, its cache :class:`Entry`, read later —
    or None for a failure; excluded (path, reason); a function preparing one record again, for a cache entry
    found damaged later; None without a cache)."""
    preparation = Preparation(volume, size, fit, window, volume_index)
    identities = [_identity(r.path) for r in records]
    held = cache.lookup(preparation, [i for i in identities if i]) if cache is not None else {}
    unit = size ** (3 if volume else 2)
    estimate = sum(e.nbytes for e in held.values()) + unit * (len(records) - len(held))
    on_disk = cache is not None and memory_mb is not None and estimate > memory_mb * 2**20
    results: list[np.ndarray | Entry | str | None] = [None] * len(records)
    damaged = []
    for k, (rec, identity) in enumerate(zip(records, identities)):
        entry = held.get(identity) if identity else None
        if entry is None:
            continue
        if on_disk:  # read (and checked) when training asks for it
            results[k] = entry
        else:
            try:
                results[k] = cache.read(entry)  # type: ignore[union-attr]
            except EntryDamaged:
                damaged.append(identity)
                continue
        _file_facts(rec, entry.meta)
    if damaged:
        cache.forget(preparation, damaged)  # type: ignore[union-attr]
        warnings.warn(f"{len(damaged)} entries of the prepared-image cache were damaged; those files are decoded again",
                      stacklevel=3)

    preparer = Preparer(volume, size, fit, window, volume_index, cache)

    todo = [k for k, r in enumerate(results) if r is None]
    pending: list[tuple[int, np.ndarray, dict]] = []

    def keep(items: list[tuple[int, np.ndarray, dict]]) -> None:
        stored = _keep(cache, preparation, [(identities[k], a, f) for k, a, f in items])  # type: ignore[arg-type]
        if on_disk and stored is not None:  # the arrays leave memory: training reads them from the cache
            for k, _, _ in items:
                results[k] = stored[identities[k]]  # type: ignore[index]

    decoder = dataclasses.replace(preparer, cache=None)  # what travels to a decoding process: no open cache
    with Progress(disable=not progress or not todo, transient=True) as bar:
        task = bar.add_task(f"reading {len(todo)} images" + (f" ({len(records) - len(todo)} from the cache)" if held else ""),
                            total=len(todo))
        left, processes = todo, True
        while left:
            pool = _decode_pool(len(left), processes)
            done = []
            try:
                with pool:
                    for k, res in zip(left, pool.map(decoder.prepare, [records[k] for k in left], chunksize=32)):
                        done.append(k)
                        bar.advance(task)
                        if isinstance(res, str):
                            results[k] = res
                            continue
                        results[k], facts = res
                        _file_facts(records[k], facts)
                        if cache is not None and identities[k]:
                            pending.append((k, res[0], facts))
                            if len(pending) >= 256:
                                keep(pending)
                                pending = []
            except BrokenProcessPool as exc:  # a decoding process died (killed, out of memory): threads go on
                warnings.warn(f"a process decoding images stopped ({exc}); the {len(left) - len(done)} files left are "
                              "read in threads", stacklevel=3)
                left, processes = left[len(done):], False
                continue
            left = []
    if cache is not None and pending:
        keep(pending)
    kept = [r if isinstance(r, (np.ndarray, Entry)) else None for r in results]
    excluded = [(str(rec.path), r) for rec, r in zip(records, results) if isinstance(r, str)]

    return kept, excluded, (preparer.repair if cache is not None else None)


def _identity(path: Path) -> str | None:
    try:
        return file_identity(path)
    except OSError:
        return None  # decoding says what is wrong with it


def _keep(cache: PreparedCache, preparation: Preparation, items: list[tuple[str, np.ndarray, dict]]) -> dict[str, Entry] | None:
    """Store ``items`` in the cache (their entries); a cache that cannot be written costs a warning and None, never the run."""
    try:
        return cache.store(preparation, items)
    except (OSError, sqlite3.Error) as exc:
        warnings.warn(f"the prepared-image cache {cache.root} could not be written ({exc.__class__.__name__}: {exc}); "
                      "training goes on without keeping these files prepared", stacklevel=3)
        return None
