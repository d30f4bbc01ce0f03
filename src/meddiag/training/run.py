"""``train``: one configuration in, one run folder out.

The run folder holds ``config.yaml`` (the resolved configuration: ``--config`` of it
reproduces the run), ``data.json`` (the data as used: classes, split sizes, excluded
files), ``splits/*.csv`` (the file of each image in each split, for file sources),
``checkpoints/best.ckpt`` and ``last.ckpt``, and ``history.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from meddiag.data.dataset import ImageData
from meddiag.data.sources import load_data
from meddiag.models.checkpoint import ModelCard
from meddiag.models.registry import get_entry, model_options
from meddiag.training.config import TrainConfig
from meddiag.training.datamodule import ImageDataModule
from meddiag.training.history import HistoryWriter
from meddiag.training.losses import auto_class_weights
from meddiag.training.module import DiagnosisModule
from meddiag.errors import ConfigError


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    data: ImageData
    config: TrainConfig
    train_seconds: float
    val_auc: float | None  # of the weights kept (the final ones, or the best epoch's with select: best)
    is_global_zero: bool = True  # False in the extra processes of a multi-device run


def default_run_dir(config: TrainConfig, root: Path = Path("runs")) -> Path:
    """``runs/<data>-<model>``, or with ``-2``, ``-3``... if that already exists."""
    stem = re.sub(r"[^A-Za-z0-9_.@-]+", "_", Path(config.data.rstrip("/\\")).name or config.data)
    base = root / f"{stem}-{config.model}"
    path, n = base, 2
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def load_training_data(config: TrainConfig, progress: bool = True) -> ImageData:
    """The data of a run, read exactly as the configuration says (same size, fit and split seed)."""
    return load_data(
        config.data, image_size=config.image_size, fit=config.fit, window=config.window,
        volume_index=config.volume_index, seed=config.seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction, progress=progress,
    )


def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None, data: ImageData | None = None,
          callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Train a model as ``config`` says and write its run folder.

    With ``resume``, ``config.out`` must be an earlier run folder: training continues
    from its ``checkpoints/last.ckpt`` with the same settings. ``data``, if given, is used
    instead of reading ``config.data`` (cross-validation passes each fold's splits); ``callbacks``
    are added to Lightning's (tuning adds its pruning callback).
    """
    get_entry(config.model)  # fail on an unknown model or option before reading any data
    unknown = sorted(set(config.model_kwargs) - set(model_options(config.model)))
    if unknown:
        raise ConfigError(f"model {config.model} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(model_options(config.model)) or 'none'}")
    progress = sys.stderr.isatty() if progress is None else progress
    # Under DDP, Lightning re-runs this command once per extra process: those processes find the
    # run folder made by process 0 and must join it, not refuse it or write it again.
    launched_rank = int(os.environ.get("LOCAL_RANK", "0"))
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.exists():
            raise ConfigError(f"cannot resume: {last} does not exist")
    elif launched_rank == 0 and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another --out")

    L.seed_everything(config.seed, workers=True, verbose=False)
    data = data if data is not None else load_training_data(config, progress and launched_rank == 0)
    config = config.model_copy(update={
        "image_size": data.image_size, "out": str(run_dir),
        "batch_size": config.batch_size or default_batch_size(len(data.splits["train"].labels), data.spatial_dims),
    })
    if launched_rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.to_yaml(run_dir / "config.yaml")
        write_data_record(data, run_dir)

    card = ModelCard(
        model_name=config.model, model_kwargs=config.model_kwargs, class_names=data.class_names, task=data.task, image_size=data.image_size,
        in_channels=data.in_channels, spatial_dims=data.spatial_dims, mean=config.mean, std=config.std,
        fit=config.fit, window=config.window, volume_index=config.volume_index, threshold=config.threshold,
        tta=config.tta, mc_dropout=config.mc_dropout,
        data_name=data.name,
    )
    module = DiagnosisModule(
        card=card.model_dump(),
        optim=config.model_dump(include={"optimizer", "lr", "weight_decay", "scheduler", "epochs"}),
        augment=config.augment.model_dump(),
        loss={"kind": config.loss, "gamma": config.focal_gamma,
              "weights": auto_class_weights(data.splits["train"].labels, data.num_classes, data.task)
              if config.class_weights == "auto" else None},
        ema_decay=config.ema_decay,
    )
    # best.ckpt, the model: weights and model card only (what predicting needs), written after each
    # validation (select: last) or when the validation AUC improves (select: best).
    # last.ckpt: full state for --resume.
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val_auc" if config.select == "best" else None, mode="max",
        save_top_k=1, save_weights_only=True, enable_version_counter=False,
    )
    last_state = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True, enable_version_counter=False)
    callbacks = [checkpoints, last_state, HistoryWriter(run_dir / "history.csv", echo=not progress), *(callbacks or [])]
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_auc", mode="max", patience=config.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices,
        precision=resolve_precision(config.precision, config.accelerator, data.spatial_dims), callbacks=callbacks, logger=False, default_root_dir=run_dir,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # In-memory uint8 tensors need no loader workers; Lightning's advice does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        # Intended: batches are scaled and augmented on the device by the module, whatever the data module.
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        # Raised inside Lightning itself against newer torch; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        trainer.fit(module, datamodule=ImageDataModule(data, config.batch_size, config.num_workers, config.sampler == "balanced"),
                    ckpt_path=last if resume else None)
    seconds = time.perf_counter() - start
    best = Path(checkpoints.best_model_path) if checkpoints.best_model_path else last
    score = checkpoints.best_model_score if config.select == "best" else trainer.callback_metrics.get("val_auc")
    return TrainResult(run_dir, best, data, config, seconds, float(score) if score is not None else None,
                       is_global_zero=trainer.is_global_zero)


MIN_STEPS_PER_EPOCH = 16


def default_batch_size(n_train: int, spatial_dims: int = 2) -> int:
    """128 for images, 32 for volumes; smaller (a power of two, at least 8) for small training sets,
    so that an epoch still has about 16 optimiser steps. BreastMNIST's 546 images get 32: at 128 an
    epoch was 4 steps, and 20 epochs were too few updates for the network to settle (its validation
    AUC was still climbing at the end)."""
    largest = 128 if spatial_dims == 2 else 32
    fitting = max(8, n_train // MIN_STEPS_PER_EPOCH)
    return min(largest, 1 << (fitting.bit_length() - 1))


def resolve_precision(precision: str, accelerator: str, spatial_dims: int = 2) -> str:
    """``auto`` -> ``bf16-mixed`` on hardware with native bf16 (CUDA >= Ampere; CPUs with
    AVX512-BF16 or AMX, for 2D only), which nearly doubles CPU training speed; ``32-true`` elsewhere.

    Volumes train in fp32 on CPUs: with torch 2.13's CPU kernels, bf16 3D convolutions on small
    feature maps intermittently returned inf/NaN from finite input (ResNet-18, 28^3 volumes).
    """
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if accelerator in ("auto", "cpu") and cpu_bf16 and spatial_dims == 2:
        return "bf16-mixed"
    return "32-true"


def write_data_record(data: ImageData, run_dir: Path) -> None:
    """``data.json`` (classes, split sizes and origin, excluded files) and ``splits/<split>.csv``."""
    record = {
        "name": data.name, "task": data.task, "class_names": data.class_names,
        "image_size": data.image_size, "in_channels": data.in_channels, "spatial_dims": data.spatial_dims,
        "splits": {
            name: {"n_images": len(split), "origin": data.split_origin.get(name, "given"),
                   "per_class": dict(zip(data.class_names, split.class_counts(data.num_classes)))}
            for name, split in data.splits.items()
        },
        "excluded": [{"path": p, "reason": r} for p, r in data.excluded],
    }
    (run_dir / "data.json").write_text(json.dumps(record, indent=2))
    if any(split.paths for split in data.splits.values()):
        (run_dir / "splits").mkdir(exist_ok=True)
        for name, split in data.splits.items():
            with open(run_dir / "splits" / f"{name}.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["path", "label"])
                for path, label in zip(split.paths or [], split.labels.tolist()):
                    if data.task == "multilabel":  # present findings; unrecorded ones marked with '?'
                        label = ";".join(c + ("?" if v != v else "") for c, v in zip(data.class_names, label) if v != 0)
                        writer.writerow([path, label])
                    else:
                        writer.writerow([path, data.class_names[label]])
