"""Image data sets split for training: the common form every data source is read into (in memory, or on disk
in the prepared-image cache when larger than memory)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from meddiag.data.cache import DiskImages

if TYPE_CHECKING:
    from meddiag.data.covariates import CovariateTable

Task = Literal["binary", "multiclass", "multilabel"]
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split of a data set, held in memory.

    images: uint8 tensor (N, C, H, W), or (N, C, D, H, W) for volumes; for data sets larger than memory a
        :class:`~meddiag.data.cache.DiskImages`, which reads them from the prepared-image cache when indexed.
    labels: int64 (N,) class indices, or float32 (N, K) 0/1 for multi-label tasks.
    paths: the source file of each image, or None for array sources (MedMNIST).
    """

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str] | None = None
    groups: list[str] | None = None  # a one-way patient key per image, where patients are known
    # Per-image attributes from a manifest's other columns (e.g. sex, age_group, site), for subgroup analysis.
    meta: dict[str, list[str]] = field(default_factory=dict)
    # The patients' covariates (typed, not yet encoded; see meddiag.data.covariates), one row per image.
    covariates: CovariateTable | None = None

    def subset(self, index: Sequence[int]) -> Split:
        """The images at ``index``, with their labels, paths, groups and attributes."""
        rows = [int(i) for i in index]
        idx = torch.as_tensor(rows, dtype=torch.long)
        paths = [self.paths[i] for i in rows] if self.paths is not None else None
        groups = [self.groups[i] for i in rows] if self.groups is not None else None
        meta = {k: [v[i] for i in rows] for k, v in self.meta.items()}
        covariates = self.covariates.take(rows) if self.covariates is not None else None
        images = self.images.take(rows) if isinstance(self.images, DiskImages) else self.images[idx]
        return Split(images, self.labels[idx], paths, groups, meta, covariates)

    @staticmethod
    def concat(parts: list[Split]) -> Split:
        """One split holding ``parts`` in order; paths, groups and attributes kept only if every part has them."""
        paths = [p for part in parts for p in part.paths] if all(part.paths is not None for part in parts) else None
        groups = [g for part in parts for g in part.groups] if all(part.groups is not None for part in parts) else None
        keys = set.intersection(*(set(part.meta) for part in parts)) if parts else set()
        meta = {k: [v for part in parts for v in part.meta[k]] for k in sorted(keys)}
        covariates = None
        if parts and all(part.covariates is not None for part in parts):
            from meddiag.data.covariates import CovariateTable

            covariates = CovariateTable.concat([part.covariates for part in parts])  # type: ignore[misc]
        if all(isinstance(p.images, DiskImages) for p in parts):
            images = DiskImages.concat([p.images for p in parts])  # type: ignore[misc]
        else:
            images = torch.cat([p.images if isinstance(p.images, torch.Tensor) else p.images[:] for p in parts])
        return Split(images, torch.cat([p.labels for p in parts]), paths, groups, meta, covariates)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self, num_classes: int) -> list[int]:
        if self.labels.ndim == 2:  # multi-label: images with each finding (unknown entries are NaN)
            return [int(v) for v in torch.nan_to_num(self.labels).sum(0).tolist()]
        return torch.bincount(self.labels, minlength=num_classes).tolist()


@dataclass
class ImageData:
    """A data set ready for training: splits in memory plus what the model must know.

    ``split_origin`` says for each split whether it came with the data ("given") or was
    carved out of the training set ("carved"). ``excluded`` lists (path, reason) of files
    that could not be used.
    """

    name: str
    task: Task
    class_names: list[str]
    splits: dict[str, Split]
    image_size: int
    in_channels: int
    spatial_dims: int = 2
    split_origin: dict[str, str] = field(default_factory=dict)
    excluded: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""  # the file or folder read, as an absolute path ("" when not from one)
    positive_class: str | None = None  # binary tasks: the finding (always class_names[1]; see meddiag.data.classes)
    covariate_join: dict = field(default_factory=dict)  # the joined table's summary (file, key, images matched/absent)
    acquisition: dict = field(default_factory=dict)  # DICOM files: {"modality": {"CR": n, ...}, "body_part": {"CHEST": n, ...}}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> str:
        """One line per split: images and images per class."""
        lines = []
        for name, split in self.splits.items():
            counts = ", ".join(f"{c}={n}" for c, n in zip(self.class_names, split.class_counts(self.num_classes)))
            origin = f" ({self.split_origin[name]})" if name in self.split_origin else ""
            lines.append(f"{name}{origin}: {len(split)} images [{counts}]")
        return "\n".join(lines)
