"""Image folders: ``ROOT/CLASS/*`` or ``ROOT/{train,val,test}/CLASS/*``."""

from __future__ import annotations

from pathlib import Path

from meddiag.data.dicom import is_dicom_file
from meddiag.data.files import FileRecord
from meddiag.data.images import IMAGE_EXTENSIONS
from meddiag.errors import DataError

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                "validation": "val", "test": "test", "testing": "test"}


def scan_image_folder(root: str | Path) -> list[FileRecord]:
    """List the labelled image files of a class-per-folder tree.

    If ROOT holds folders named train/val/test (also training, valid, validation,
    testing), each is a split with one folder per class; otherwise each folder of ROOT
    is a class. A class holds image files, or volumes: NIfTI files and sub-folders with a
    DICOM series. An empty class folder is an error that names it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = {p: _SPLIT_NAMES[p.name.lower()] for p in subdirs if p.name.lower() in _SPLIT_NAMES}
    if split_dirs:
        if "train" not in split_dirs.values():
            raise DataError(f"{root} has {', '.join(p.name for p in split_dirs)} folders but no train folder")
        records: list[FileRecord] = []
        for folder, split in split_dirs.items():
            records += _scan_classes(folder, split)
        train_classes = {r.label for r in records if r.split == "train"}
        extra = sorted({r.label for r in records} - train_classes)
        if extra:
            raise DataError(f"{root}: class folder(s) {', '.join(extra)} exist outside train/ but not in {root / 'train'}")
        return records
    return _scan_classes(root, None)


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by split (train, val, test; also named training, valid, validation, testing)."""
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return {_SPLIT_NAMES[p.name.lower()]: p for p in subdirs if p.name.lower() in _SPLIT_NAMES}


def class_items(folder: Path) -> list[Path]:
    """The images and volumes in a class folder: every file not hidden (a name starting with '.'),
    and each sub-folder that holds DICOM files as one series (a volume); other sub-folders are
    searched in turn. Files of other kinds are listed too, so that reading them excludes each by
    name with its reason instead of leaving it out unseen."""
    items: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if any(f.is_file() and is_dicom_file(f) for f in p.iterdir()):
                items.append(p)
            else:
                items += class_items(p)
        elif p.is_file():
            items.append(p)
    return items


def _scan_classes(folder: Path, split: str | None) -> list[FileRecord]:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{folder} has no class folders: put each class's images in a folder named after the class "
            f"(e.g. {folder}/NORMAL/img001.png)"
        )
    records = []
    for class_dir in class_dirs:
        files = class_items(class_dir)
        if not files:
            raise DataError(
                f"class folder {class_dir} contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                f"remove the folder or add its images"
            )
        records += [FileRecord(path=f, label=class_dir.name, split=split) for f in files]
    return records
