"""MedMNIST v2 / MedMNIST+ data sets by name, e.g. ``pneumoniamnist`` or ``pneumoniamnist@64``.

Files live in ``$MEDDIAG_DATA`` (default ``~/.meddiag/data``) under their official names
(``pneumoniamnist.npz``, ``pneumoniamnist_64.npz``). A missing file is downloaded from the
official record (or from ``$MEDDIAG_MEDMNIST_MIRROR``, a base URL serving the same file
names) and verified against its official md5.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddiag.data.dataset import SPLITS, ImageData, Split, Task
from meddiag.data.download import download_file, md5sum
from meddiag.errors import ConfigError, DataError, DownloadError

_TASKS: dict[str, Task] = {
    "binary-class": "binary",
    "multi-class": "multiclass",
    "ordinal-regression": "multiclass",
    "multi-label, binary-class": "multilabel",
}


@lru_cache(maxsize=1)
def catalog() -> dict:
    """The official MedMNIST metadata shipped with meddiag (labels, tasks, md5 per size)."""
    text = resources.files("meddiag.data").joinpath("medmnist_catalog.json").read_text()
    return json.loads(text)


def data_root() -> Path:
    """Where MedMNIST files are looked for and downloaded to: ``$MEDDIAG_DATA`` or ``~/.meddiag/data``."""
    return Path(os.environ.get("MEDDIAG_DATA") or Path.home() / ".meddiag" / "data").expanduser()


@dataclass(frozen=True)
class MedMNISTSpec:
    name: str
    size: int

    @property
    def file_name(self) -> str:
        return f"{self.name}.npz" if self.size == 28 else f"{self.name}_{self.size}.npz"

    @property
    def info(self) -> dict:
        return catalog()["datasets"][self.name]

    @property
    def md5(self) -> str:
        return self.info["md5"][str(self.size)]

    @property
    def url(self) -> str:
        mirror = os.environ.get("MEDDIAG_MEDMNIST_MIRROR")
        if mirror:
            return f"{mirror.rstrip('/')}/{self.file_name}"
        return catalog()["url_template"].format(file=self.file_name)


def parse_medmnist(spec: str) -> MedMNISTSpec | None:
    """Parse ``name`` or ``name@size``; None if ``spec`` is not a MedMNIST name.

    Raises :class:`DataError` for a known name with a size that does not exist.
    """
    name, _, size_text = spec.strip().lower().partition("@")
    datasets = catalog()["datasets"]
    if name not in datasets:
        return None
    sizes = sorted(int(s) for s in datasets[name]["md5"])
    try:
        size = int(size_text) if size_text else 28
    except ValueError:
        size = -1
    if size not in sizes:
        raise DataError(f"{name} comes in sizes {', '.join(map(str, sizes))}, not '{size_text}' (write e.g. {name}@{sizes[-1]})")
    return MedMNISTSpec(name, size)


def medmnist_names() -> list[str]:
    return sorted(catalog()["datasets"])


def fetch_medmnist(spec: MedMNISTSpec, root: Path | None = None, *, progress: bool = True) -> Path:
    """The verified local path of a MedMNIST file, downloading it when missing.

    A file already present whose md5 differs from the official one is refused.
    """
    root = data_root() if root is None else Path(root)
    path = root / spec.file_name
    if not path.exists():
        try:
            return download_file(spec.url, path, spec.md5, progress=progress)
        except DownloadError as exc:
            raise DownloadError(f"{spec.file_name} is not in {root} (set MEDDIAG_DATA to the folder that holds it), "
                                f"and {exc}") from None
    got = md5sum(path)
    if got != spec.md5:
        raise DataError(
            f"{path} has md5 {got}, but the official {spec.file_name} has {spec.md5}: the file is "
            f"corrupt or not the official one. Delete it and meddiag will download it again."
        )
    return path


def load_medmnist(spec: MedMNISTSpec, image_size: int | None = None, root: Path | None = None,
                  positive_class: str | None = None) -> ImageData:
    """Read a MedMNIST file into memory with its official splits and class names.

    Images stay uint8; if ``image_size`` differs from the file's size they are resized
    (bilinear, antialiased). A two-class set has its finding second (the catalog's ``positive``,
    or ``positive_class``): BreastMNIST's file labels malignant 0, meddiag labels it 1.
    """
    path = fetch_medmnist(spec, root)
    info = catalog()["datasets"][spec.name]
    task = _TASKS[info["task"]]
    spatial_dims = info["spatial_dims"]
    size = image_size or spec.size
    class_names, positive = list(info["labels"]), None
    if task == "binary":
        positive = positive_class or info.get("positive") or class_names[1]
        if positive not in class_names:
            raise ConfigError(f"--positive-class {positive}: {spec.name} has the classes {', '.join(class_names)}")
    elif positive_class is not None:
        raise ConfigError(f"--positive-class applies to two-class tasks; {spec.name} has {len(class_names)} classes")
    swap = positive == class_names[0]
    splits: dict[str, Split] = {}
    with np.load(path) as npz:
        for split in SPLITS:
            images = torch.from_numpy(npz[f"{split}_images"])
            labels = torch.from_numpy(npz[f"{split}_labels"].astype(np.int64))
            images = _channels_first(images, info["n_channels"], spatial_dims)
            if size != spec.size:
                images = _resize_uint8(images, size, spatial_dims)
            labels = labels.float() if task == "multilabel" else labels.reshape(-1)
            if swap:
                labels = 1 - labels
            splits[split] = Split(images.contiguous(), labels)
    return ImageData(
        name=spec.name if spec.size == 28 else f"{spec.name}@{spec.size}",
        task=task,
        class_names=class_names[::-1] if swap else class_names,
        splits=splits,
        image_size=size,
        in_channels=info["n_channels"],
        spatial_dims=spatial_dims,
        split_origin={s: "given" for s in SPLITS},
        source=str(Path(path).resolve()),
        positive_class=positive,
    )


def _channels_first(images: torch.Tensor, channels: int, spatial_dims: int) -> torch.Tensor:
    if channels == 1:
        return images.unsqueeze(1)
    return images.movedim(-1, 1)


def _resize_uint8(images: torch.Tensor, size: int, spatial_dims: int) -> torch.Tensor:
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    out = []
    for chunk in images.split(1024):
        x = F.interpolate(chunk.float(), size=(size,) * spatial_dims, mode=mode, antialias=spatial_dims == 2, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)
