"""Lightning data module over in-memory uint8 splits.

Batches stay uint8 until they reach the device; scaling, augmentation and
normalisation happen there, on the whole batch (see ``DiagnosisModule``).
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from meddiag.data.dataset import ImageData, Split
from meddiag.training.losses import balanced_sample_weights


class SplitDataset(Dataset):
    """(uint8 image (C, *spatial), label) pairs of one in-memory split."""

    def __init__(self, split: Split) -> None:
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class ImageDataModule(L.LightningDataModule):
    """``balanced``: training batches drawn with replacement, each image with probability inversely
    proportional to its class's frequency (an epoch still has as many images as the split)."""

    def __init__(self, data: ImageData, batch_size: int, num_workers: int = 0, balanced: bool = False) -> None:
        super().__init__()
        self.data, self.batch_size, self.num_workers, self.balanced = data, batch_size, num_workers, balanced

    def _loader(self, split: str, train: bool) -> DataLoader:
        part = self.data.splits[split]
        ds = SplitDataset(part)
        sampler = None
        if train and self.balanced:
            sampler = WeightedRandomSampler(balanced_sample_weights(part.labels, self.data.task), len(ds), replacement=True)
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.batch_size * 2, shuffle=train and sampler is None, sampler=sampler,
            # A last batch of one image breaks batch norm; dropping a partial batch loses nothing over epochs.
            drop_last=train and len(ds) > self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
