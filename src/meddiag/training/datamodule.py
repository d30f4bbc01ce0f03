"""Lightning data module over in-memory uint8 splits.

Batches stay uint8 until they reach the device; scaling, augmentation and
normalisation happen there, on the whole batch (see ``DiagnosisModule``).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from meddiag.data.covariates import CovariateSchema
from meddiag.data.dataset import ImageData, Split
from meddiag.models.fusion import covariate_tensor
from meddiag.training.losses import balanced_sample_weights


class SplitDataset(Dataset):
    """(uint8 image (C, *spatial), label) pairs of one in-memory split; with ``covariates`` (N, F)
    float32 encoded patient data, (image, covariates, label) triples."""

    def __init__(self, split: Split, covariates: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.covariates = split.images, split.labels, covariates

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.covariates is not None:
            return self.images[i], self.covariates[i], self.labels[i]
        return self.images[i], self.labels[i]



class EpochSampler(Sampler[int]):
    """The training order of one epoch, a function of (seed, epoch) alone: a resumed run draws the
    same images in the same order as an uninterrupted one. ``epoch`` gives the epoch about to run
    (the trainer's current epoch: Lightning's own ``set_epoch`` count lags by one after resuming from
    an end-of-epoch checkpoint). ``weights``: draw with replacement, proportionally to them (the
    balanced sampler); None: a permutation.

    Distributed (``world`` processes): process ``rank`` takes every ``world``-th image of the one order,
    starting at its rank, so that the processes' batches of step k together are the single process's
    batch k; the order's last ``n % world`` images (a different few each epoch) are left out, so that
    every process takes as many steps."""

    def __init__(self, n: int, seed: int, weights: torch.Tensor | None = None, epoch: Callable[[], int] = lambda: 0,
                 rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.weights, self.epoch, self.rank, self.world = n, seed, weights, epoch, rank, world

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):  # noqa: ANN204 - Iterator[int]
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch()))
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        return iter(order[: len(self) * self.world][self.rank :: self.world].tolist())


class ShardSampler(Sampler[int]):
    """Evaluation on ``world`` processes: process ``rank`` takes images rank, rank + world, ... — each image
    exactly once over all processes (no image repeated to even out the shards, as a DistributedSampler
    would, which would count it twice in a validation metric)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):  # noqa: ANN204 - Iterator[int]
        return iter(range(self.rank, self.n, self.world))


def epoch_seed(seed: int, epoch: int) -> int:
    """The random seed of epoch ``epoch`` of a run seeded ``seed``."""
    return (seed * 1_000_003 + epoch * 7_919 + 1) % (2**63)


class ImageDataModule(L.LightningDataModule):
    """``balanced``: training batches drawn with replacement, each image with probability inversely
    proportional to its class's frequency (an epoch still has as many images as the split).
    The training order depends on ``seed`` and the epoch only (see :class:`EpochSampler`). On several
    processes each takes its share of every split itself (:class:`EpochSampler`, :class:`ShardSampler`):
    the trainer is told not to put samplers of its own in (``use_distributed_sampler=False``)."""

    def __init__(self, data: ImageData, batch_size: int, num_workers: int = 0, balanced: bool = False, seed: int = 0,
                 covariates: CovariateSchema | None = None) -> None:
        super().__init__()
        self.data, self.batch_size, self.num_workers, self.balanced, self.seed = data, batch_size, num_workers, balanced, seed
        self.covariates = covariates

    def _loader(self, split: str, train: bool) -> DataLoader:
        part = self.data.splits[split]
        ds = SplitDataset(part, covariate_tensor(self.covariates, part.covariates))
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if train:
            weights = balanced_sample_weights(part.labels, self.data.task) if self.balanced else None
            sampler: Sampler[int] = EpochSampler(len(ds), self.seed, weights, lambda: self.trainer.current_epoch if self.trainer else 0,
                                                 rank, world)
        else:
            sampler = ShardSampler(len(ds), rank, world)
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.batch_size * 2, sampler=sampler,
            # A last batch of one image breaks batch norm; dropping a partial batch loses nothing over epochs.
            drop_last=train and len(sampler) > self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
