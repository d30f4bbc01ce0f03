"""``meddiag inspect``: what a data set holds, what cannot be read, and what leaks between splits.

Leakage is an image (identical decoded pixels) or a patient in more than one split. Patients
are shown only by a one-way key, never by their id, so the report carries no PHI.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from meddiag.data.dicom import is_dicom_file, patient_key, read_dicom, read_dicom_identity
from meddiag.data.files import FileRecord, is_volume_source
from meddiag.data.folder import scan_image_folder
from meddiag.data.images import read_image
from meddiag.data.manifest import read_manifest
from meddiag.data.medmnist import load_medmnist, parse_medmnist
from meddiag.data.volumes import is_nifti_file, read_volumes
from meddiag.errors import DataError, ImageReadError, failure_reason

UNSPLIT = "(unsplit)"


@dataclass
class FileFacts:
    split: str
    label: str
    path: str
    modality: str = ""
    size: str = ""          # "WxH" (or "WxHxF" for multi-frame)
    bit_depth: str = ""     # e.g. "8", "16", "8x3"
    spacing: str = ""       # "0.70x0.70 mm"
    pixel_hash: str = ""
    patient: str | None = None  # one-way key
    error: str | None = None


@dataclass
class DataInspection:
    """The facts ``meddiag inspect`` prints; ``to_dict()`` is its JSON form."""

    name: str
    counts: dict[str, dict[str, int]]
    modalities: dict[str, int]
    sizes: dict[str, int]
    bit_depths: dict[str, int]
    spacings: dict[str, int]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    duplicate_images: list[dict] = field(default_factory=list)
    patients_across_splits: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def leakage(self) -> bool:
        return bool(self.duplicate_images or self.patients_across_splits)

    def to_dict(self) -> dict:
        return asdict(self) | {"leakage": self.leakage}


def inspect_data(spec: str, progress: bool = True) -> DataInspection:
    """Inspect a MedMNIST name, an image folder or a CSV manifest."""
    mnist = parse_medmnist(spec)
    facts = _medmnist_facts(spec) if mnist is not None else _file_facts(_records(spec), progress)
    return summarise(spec, facts)


def _records(spec: str) -> list[FileRecord]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return scan_image_folder(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_manifest(path)
    raise DataError(f"{spec}: not a MedMNIST name, an image folder or a .csv manifest")


def _medmnist_facts(spec: str) -> list[FileFacts]:
    data = load_medmnist(parse_medmnist(spec))  # type: ignore[arg-type]
    facts = []
    for split, part in data.splits.items():
        shape = "x".join(map(str, part.images.shape[2:][::-1]))
        depth = "8" if data.in_channels == 1 else f"8x{data.in_channels}"
        for i in range(len(part)):
            label = data.class_names[int(part.labels[i])] if part.labels.ndim == 1 else "multi-label"
            digest = hashlib.sha1(part.images[i].numpy().tobytes()).hexdigest()
            facts.append(FileFacts(split, label, f"{split}[{i}]", "", shape, depth, "", digest))
    return facts


def _file_facts(records: list[FileRecord], progress: bool) -> list[FileFacts]:
    from rich.progress import Progress

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool, Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"inspecting {len(records)} files", total=len(records))
        out = []
        for fact in pool.map(_facts_of, records, chunksize=16):
            out.append(fact)
            bar.advance(task)
    return out


def _facts_of(rec: FileRecord) -> FileFacts:
    label = rec.label if rec.targets is None else ";".join(c for c, v in rec.targets.items() if v == 1) or "(no finding)"
    fact = FileFacts(rec.split or UNSPLIT, label, str(rec.path))
    if rec.patient_id is not None:
        fact.patient = patient_key(rec.patient_id)
    try:
        if is_volume_source(Path(rec.path)):
            volumes = read_volumes(rec.path)
            if len(volumes) != 1:
                raise ImageReadError(rec.path, f"the folder holds {len(volumes)} DICOM series")
            v = volumes[0]
            fact.modality = v.modality or ("NIfTI" if is_nifti_file(Path(rec.path)) else "DICOM")
            fact.size = "x".join(map(str, v.array.shape))
            fact.bit_depth = "volume"
            fact.spacing = "x".join(f"{s:.2f}" for s in v.spacing) + " mm"
            fact.pixel_hash = hashlib.sha1(v.array.tobytes()).hexdigest()
            if fact.patient is None and v.sources and is_dicom_file(Path(v.sources[0])):
                fact.patient = read_dicom_identity(v.sources[0]).patient_key
        elif is_dicom_file(Path(rec.path)):
            image = read_dicom(rec.path)
            fact.modality = image.modality or "DICOM"
            rows, cols = image.pixels.shape[-3:-1] if image.is_colour else image.pixels.shape[-2:]
            fact.size = f"{cols}x{rows}" + (f"x{image.frames}" if image.frames > 1 else "")
            fact.bit_depth = f"{image.bits_stored or '?'}" + ("x3" if image.is_colour else "")
            if image.spacing:
                fact.spacing = f"{image.spacing[1]:.2f}x{image.spacing[0]:.2f} mm"
            fact.pixel_hash = hashlib.sha1(np.ascontiguousarray(image.pixels).tobytes()).hexdigest()
            fact.patient = fact.patient or image.identity.patient_key
        else:
            arr = read_image(rec.path)
            with Image.open(rec.path) as img:
                fact.modality = (img.format or "image").upper()
                fact.size = f"{img.width}x{img.height}"
                bits = {"1": "1", "L": "8", "P": "8", "RGB": "8x3", "RGBA": "8x4", "I;16": "16", "I;16B": "16", "I": "32", "F": "32f"}
                fact.bit_depth = bits.get(img.mode, img.mode)
            fact.pixel_hash = hashlib.sha1(arr.tobytes()).hexdigest()
    except Exception as exc:  # noqa: BLE001 - whatever one file raises is reported for that file
        fact.error = failure_reason(exc)
    return fact


def summarise(name: str, facts: list[FileFacts]) -> DataInspection:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for f in facts:
        if f.error is None:
            counts[f.split][f.label] += 1
    good = [f for f in facts if f.error is None]
    by_hash: dict[str, list[FileFacts]] = defaultdict(list)
    for f in good:
        by_hash[f.pixel_hash].append(f)
    duplicates = [
        {"splits": sorted({f.split for f in group}), "files": [f.path for f in group]}
        for group in by_hash.values() if len({f.split for f in group}) > 1
    ]
    by_patient: dict[str, set[str]] = defaultdict(set)
    for f in good:
        if f.patient:
            by_patient[f.patient].add(f.split)
    patients = [{"patient_key": k, "splits": sorted(s)} for k, s in sorted(by_patient.items()) if len(s) > 1]
    return DataInspection(
        name=name,
        counts={s: dict(sorted(c.items())) for s, c in sorted(counts.items())},
        modalities=dict(Counter(f.modality for f in good).most_common()),
        sizes=dict(Counter(f.size for f in good).most_common()),
        bit_depths=dict(Counter(f.bit_depth for f in good).most_common()),
        spacings=dict(Counter(f.spacing for f in good if f.spacing).most_common()),
        unreadable=[{"path": f.path, "reason": f.error} for f in facts if f.error is not None],
        duplicate_images=duplicates,
        patients_across_splits=patients,
        warnings=_class_warnings(facts),
    )


def _class_warnings(facts: list[FileFacts]) -> list[str]:
    good = [f for f in facts if f.error is None]
    labels = sorted({f.label for f in good})
    out = []
    if len(labels) == 1:
        out.append(f"only one class ('{labels[0]}'): a classifier needs at least 2. Is the folder one level too high? "
                   "It should hold one folder per class (or train/val/test folders of class folders)")
    volumes = [f for f in good if f.bit_depth == "volume"]
    if volumes and len(volumes) < len(good):
        minority = volumes if len(volumes) * 2 < len(good) else [f for f in good if f.bit_depth != "volume"]
        kind = "volumes" if minority is volumes else "2D images"
        out.append(f"{len(volumes)} volumes and {len(good) - len(volumes)} 2D images: a model takes one or the other, so "
                   f"training would exclude the {len(minority)} {kind} (e.g. {minority[0].path})")
    return out


def render(report: DataInspection, limit: int = 10) -> str:
    """A plain-text report: counts table, then facts, then problems (first ``limit`` of each)."""
    classes = sorted({c for per in report.counts.values() for c in per})
    width = max([len(c) for c in classes] + [12])
    lines = [f"data: {report.name}", "", f"{'split':<12}" + "".join(f"{c:>{width + 2}}" for c in classes) + f"{'total':>9}"]
    for split, per in report.counts.items():
        lines.append(f"{split:<12}" + "".join(f"{per.get(c, 0):>{width + 2}}" for c in classes) + f"{sum(per.values()):>9}")

    def top(counter: dict[str, int]) -> str:
        items = list(counter.items())
        text = ", ".join(f"{k or '?'} ({v})" for k, v in items[:5])
        return text + (f", ... {len(items) - 5} more" if len(items) > 5 else "")

    lines += ["", f"modalities: {top(report.modalities)}", f"sizes (WxH): {top(report.sizes)}",
              f"bit depth: {top(report.bit_depths)}"]
    if report.spacings:
        lines.append(f"pixel spacing: {top(report.spacings)}")
    lines += [f"warning: {w}" for w in report.warnings]
    lines.append(f"unreadable files: {len(report.unreadable)}")
    lines += [f"  {u['path']}: {u['reason']}" for u in report.unreadable[:limit]]
    lines.append(f"identical images in more than one split: {len(report.duplicate_images)}" + ("  LEAKAGE" if report.duplicate_images else ""))
    lines += [f"  {', '.join(d['splits'])}: {' = '.join(d['files'][:3])}" for d in report.duplicate_images[:limit]]
    lines.append(f"patients in more than one split: {len(report.patients_across_splits)}" + ("  LEAKAGE" if report.patients_across_splits else ""))
    lines += [f"  patient key {p['patient_key']}: {', '.join(p['splits'])}" for p in report.patients_across_splits[:limit]]
    return "\n".join(lines)
