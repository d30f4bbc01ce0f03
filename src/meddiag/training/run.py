"""``train``: one configuration in, one run folder out (its layout: :mod:`meddiag.runfolder`).

Fault tolerant: ``checkpoints/last.ckpt`` (the full training state) is written atomically after
every epoch, so a run killed at any moment loses at most the epoch in progress and ``--resume``
continues it; every epoch's randomness depends on (seed, epoch) alone, so the resumed run is the
uninterrupted one. Before any data is read, the run folder must be writable and its disk must have
room for the checkpoints. When training ends, ``training.json`` records it and ``last.ckpt`` is
removed (``keep_resume_state`` keeps it); ``best.ckpt`` keeps only what predicting needs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from meddiag.data.covariates import CovariateSchema, missing_summary
from meddiag.data.dataset import ImageData
from meddiag.data.sources import load_data
from meddiag.errors import ConfigError
from meddiag.models.checkpoint import ModelCard, slim_checkpoint
from meddiag.models.registry import get_entry, model_options
from meddiag.models.weights import WeightsFile, fetch_published, initialise, kept_stem, published_weights, resolve_weights
from meddiag.runfolder import RunFolder, write_text_atomic
from meddiag.training.config import TrainConfig
from meddiag.training.datamodule import ImageDataModule
from meddiag.training.history import HistoryWriter
from meddiag.training.losses import auto_class_weights
from meddiag.training.module import DiagnosisModule
from meddiag.training.shortcuts import covariate_shortcuts


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


def load_training_data(config: TrainConfig, progress: bool = True, run: str | Path | None = None) -> ImageData:
    """The data of a run, read exactly as the configuration says (same size, fit and split seed).
    With ``run`` (its folder), a MedMNIST file is also found where training read it (``data.json``),
    so evaluating offline needs no ``MEDDIAG_DATA``."""
    return load_data(
        config.data, image_size=config.image_size, fit=config.fit, window=config.window,
        volume_index=config.volume_index, seed=config.seed,
        val_fraction=config.val_fraction, test_fraction=config.test_fraction, progress=progress,
        medmnist_root=_recorded_medmnist_root(config, run), positive_class=config.positive_class,
        covariates=config.tabular_spec(), cache=config.cache, memory_mb=config.memory_mb,
    )


def _recorded_medmnist_root(config: TrainConfig, run: str | Path | None) -> Path | None:
    from meddiag.data.medmnist import data_root, parse_medmnist

    spec = parse_medmnist(config.data)
    if run is None or spec is None or (data_root() / spec.file_name).exists():
        return None
    record = RunFolder.of(run).data_record
    try:
        source = Path(json.loads(record.read_text()).get("source") or "")
    except (OSError, ValueError):
        return None
    return source.parent if source.name == spec.file_name and source.is_file() else None


def check_writable(run_dir: Path) -> None:
    """:class:`ConfigError` before any data is read when ``run_dir`` cannot be written."""
    import tempfile

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}; choose another --out") from None


def process_rank() -> int:
    """0 in a distributed run's first process (the one that writes the run folder), else another number; known
    before the trainer exists: ``RANK`` (torchrun), ``SLURM_PROCID`` (srun), else Lightning's own launcher's
    ``NODE_RANK`` and ``LOCAL_RANK``. 0 in a run of one process."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    node, local = (int(os.environ.get(n, "0") or 0) for n in ("NODE_RANK", "LOCAL_RANK"))
    return local if node == 0 else 1 + local


def trainer_strategy(strategy: str, accelerator: str) -> Any:
    """Lightning's strategy for ``strategy``: DDP on CPUs speaks gloo (NCCL is for GPUs); FSDP shards parameters."""
    if strategy == "auto":
        return "auto"
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else None)
    return "fsdp"


def check_disk_space(run_dir: Path, model: torch.nn.Module) -> None:
    """:class:`ConfigError` before the first epoch when the disk of ``run_dir`` lacks room for the
    checkpoints (rather than failing hours later at the first one). The estimate is generous: the
    parameters x 4 bytes for the model (twice, while one checkpoint replaces another), the averaged
    copy and Adam's two moments in last.ckpt, and again for its temporary copy while it is rewritten."""
    import shutil

    needed_bytes = 10 * 4 * sum(p.numel() for p in model.parameters()) + 2**20
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(f"only {free / 2**20:,.0f} MB free on the disk of {run_dir}; training needs about "
                          f"{needed_bytes / 2**20:,.0f} MB for its checkpoints: free some space or choose another --out")


def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None, data: ImageData | None = None,
          callbacks: list[L.Callback] | None = None) -> TrainResult:
    """Train a model as ``config`` says and write its run folder.

    With ``resume``, ``config.out`` must be an earlier run folder: training continues
    from its ``checkpoints/last.ckpt`` with the same settings. ``data``, if given, is used
    instead of reading ``config.data`` (cross-validation passes each fold's splits); ``callbacks``
    are added to Lightning's (tuning adds its pruning callback).
    """
    get_entry(config.model)  # fail on an unknown model or option before reading any data
    if config.model == "tabular" and not config.uses_covariates:
        raise ConfigError("the tabular model learns from patient data only: give --covariates (manifest columns) or --tabular")
    unknown = sorted(set(config.model_kwargs) - set(model_options(config.model)))
    if unknown:
        raise ConfigError(f"model {config.model} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(model_options(config.model)) or 'none'}")
    progress = sys.stderr.isatty() if progress is None else progress
    # Under DDP, Lightning re-runs this command once per extra process (torchrun and SLURM start them all):
    # the others find the run folder made by process 0 and must join it, not refuse it or write it again.
    launched_rank = process_rank()
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    folder = RunFolder(run_dir)
    last = folder.resume_checkpoint
    if resume:
        if not last.exists() and not folder.training_record.exists():
            raise ConfigError(f"cannot resume: {last} does not exist (a run saves it after its first epoch)")
    elif launched_rank == 0 and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another --out")
    if launched_rank == 0:
        check_writable(run_dir)
    # a weights file or URL is found (downloaded) before the data are read: a wrong path fails in seconds
    weights = resolve_weights(config.init_weights, progress=progress) if config.init_weights and not resume else None

    L.seed_everything(config.seed, workers=True, verbose=False)
    data = data if data is not None else load_training_data(config, progress and launched_rank == 0, run_dir if resume else None)
    config = config.model_copy(update={
        "image_size": data.image_size, "out": str(run_dir), "positive_class": data.positive_class,
        "tabular": str(Path(config.tabular).resolve()) if config.tabular else None,
        "batch_size": config.batch_size or default_batch_size(len(data.splits["train"].labels), data.spatial_dims),
    })
    if resume and not last.exists():  # training had finished; only what came after it was cut short
        record = json.loads(folder.training_record.read_text())
        if config.epochs > record.get("max_epochs", record.get("epochs", config.epochs)):  # early stopping ends sooner
            raise ConfigError(f"{run_dir} finished its {record['epochs']} epochs and kept no resume state, so it cannot "
                              "train for more: start a new run (keep_resume_state: true keeps the state of a run)")
        return TrainResult(run_dir, folder.model_checkpoint, data, config, record.get("train_seconds", 0.0), record.get("val_auc"))
    if config.pretrained and not resume:
        published = published_weights(config.pretrained, config.model, data.spatial_dims)
        config = config.model_copy(update={"model_kwargs": {**published.model_kwargs, **config.model_kwargs}})
        weights = fetch_published(published, progress=progress)
    if weights is not None and "stem" not in config.model_kwargs:
        # another meddiag model's weights keep the stem they were learned with at this run's image size
        stem = kept_stem(weights, config.model, data.spatial_dims, data.image_size)
        if stem:
            config = config.model_copy(update={"model_kwargs": {**config.model_kwargs, "stem": stem}})
    schema = fit_covariates(config, data)
    shortcuts = covariate_shortcuts(data, schema) if schema is not None else []
    if launched_rank == 0:
        config.to_yaml(folder.config)
        write_data_record(data, run_dir, shortcuts)
        for finding in shortcuts:
            warnings.warn(finding["message"], stacklevel=2)

    card = ModelCard(
        model_name=config.model, model_kwargs=config.model_kwargs, class_names=data.class_names, task=data.task, image_size=data.image_size,
        in_channels=data.in_channels, spatial_dims=data.spatial_dims, mean=config.mean, std=config.std,
        fit=config.fit, window=config.window, volume_index=config.volume_index, threshold=config.threshold,
        tta=config.tta, mc_dropout=config.mc_dropout,
        data_name=data.name, positive_class=data.positive_class,
        covariates=schema, fusion=config.fusion if schema is not None else None,
        modalities=[m.strip().upper() for m in config.modalities if m.strip()] or list(data.acquisition.get("modality", {})),
        body_parts=list(data.acquisition.get("body_part", {})),
    )
    module = DiagnosisModule(
        card=card.model_dump(),
        optim=config.model_dump(include={"optimizer", "lr", "weight_decay", "scheduler", "epochs"}),
        augment=config.augment.model_dump(),
        loss={"kind": config.loss, "gamma": config.focal_gamma,
              "weights": auto_class_weights(data.splits["train"].labels, data.num_classes, data.task)
              if config.class_weights == "auto" else None},
        ema_decay=config.ema_decay, seed=config.seed,
        covariate_dropout=0.0 if config.model == "tabular" else config.covariate_dropout,
        finetune=config.fine_tuning(),
    )
    start_from_weights(module, config, data, folder, weights, resume, announce=launched_rank == 0)
    if launched_rank == 0:
        check_disk_space(run_dir, module.model)
    # best.ckpt, the model: weights and model card only (what predicting needs), written after each
    # validation (select: last) or when the validation AUC improves (select: best).
    # last.ckpt: full state for --resume.
    checkpoints = ModelCheckpoint(
        dirpath=folder.checkpoints, filename=folder.model_checkpoint.stem, monitor="val_auc" if config.select == "best" else None,
        mode="max", save_top_k=1, save_weights_only=True, enable_version_counter=False,
    )
    # last.ckpt: the full state, replaced (atomically: Lightning writes through a temporary file)
    # at the end of every epoch, after that epoch's history row.
    last_state = ModelCheckpoint(dirpath=folder.checkpoints, filename=last.stem, monitor=None, save_top_k=1,
                                 save_on_train_epoch_end=True, enable_version_counter=False)
    callbacks = [checkpoints, last_state, HistoryWriter(folder.history, echo=not progress), *(callbacks or [])]
    if config.early_stopping_patience:
        callbacks.append(EarlyStopping(monitor="val_auc", mode="max", patience=config.early_stopping_patience))
    precision = resolve_precision(config.precision, config.accelerator, data.spatial_dims)
    loggers: Any = False
    if config.loggers and launched_rank == 0:  # loggers write from the first process only
        from lightning.pytorch.callbacks import LearningRateMonitor

        from meddiag.training.loggers import make_loggers

        loggers = make_loggers(config.loggers, run_dir, config.model_dump(mode="json"))
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
        strategy=trainer_strategy(config.strategy, config.accelerator), precision=precision, callbacks=callbacks, logger=loggers,
        default_root_dir=run_dir, enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        deterministic=False, use_distributed_sampler=False,  # the data module shards every split itself
    )
    if trainer.is_global_zero:
        print(start_line(config, data, trainer, precision, resume), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # In-memory uint8 tensors need no loader workers; Lightning's advice does not apply.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        # Intended: batches are scaled and augmented on the device by the module, whatever the data module.
        warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
        # Raised inside Lightning itself against newer torch; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        # meddiag logs per epoch, not per step: Lightning's step interval does not apply.
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        datamodule = ImageDataModule(data, config.batch_size, config.num_workers, config.sampler == "balanced", config.seed, schema)
        trainer.fit(module, datamodule=datamodule, ckpt_path=last if resume else None)
    seconds = time.perf_counter() - start
    best = Path(checkpoints.best_model_path) if checkpoints.best_model_path else folder.model_checkpoint
    score = checkpoints.best_model_score if config.select == "best" else trainer.callback_metrics.get("val_auc")
    val_auc = float(score) if score is not None else None
    if trainer.is_global_zero and not trainer.interrupted:
        slim_checkpoint(best)
        write_text_atomic(folder.training_record, json.dumps(
            {"finished": True, "epochs": trainer.current_epoch, "max_epochs": config.epochs, "train_seconds": round(seconds, 1),
             "val_auc": val_auc}, indent=2))
        if not config.keep_resume_state:
            last.unlink(missing_ok=True)
    return TrainResult(run_dir, best, data, config, seconds, val_auc, is_global_zero=trainer.is_global_zero)


def start_from_weights(module: DiagnosisModule, config: TrainConfig, data: ImageData, folder: RunFolder,
                       weights: WeightsFile | None, resume: bool, announce: bool) -> None:
    """Load the initial weights into the module's network (refusing a partial load), print the load report
    and keep it in ``init_weights.json`` and the model card. Resuming, the weights come from the resume
    checkpoint; only the backbone's names are read back from the report."""
    if not config.starts_from_weights:
        return
    if resume:
        try:
            report = json.loads(folder.init_weights.read_text())
        except (OSError, ValueError):
            raise ConfigError(f"cannot resume: {folder.init_weights} (the load report of the initial weights) is missing or damaged") from None
        module.use_backbone(report.get("backbone_parameters", []))
        module.card = module.card.model_copy(update={"init_weights": report.get("summary")})
        return
    assert weights is not None
    loaded = initialise(module.model, config.model, weights, allow_partial=config.allow_partial, inflate=config.inflate,
                        image_size=data.image_size, model_kwargs=config.model_kwargs)
    module.use_backbone(loaded.backbone_parameters)
    module.card = module.card.model_copy(update={"init_weights": loaded.summary()})
    if announce:
        print(loaded.text(), file=sys.stderr, flush=True)
        write_text_atomic(folder.init_weights, json.dumps({**loaded.to_dict(), "summary": loaded.summary()}, indent=2))


def start_line(config: TrainConfig, data: ImageData, trainer: L.Trainer, precision: str, resume: bool) -> str:
    """What is about to happen, printed before the first epoch (which may take minutes)."""
    n = {name: len(split) for name, split in data.splits.items()}
    steps = max(1, n["train"] // config.batch_size)
    size = "x".join([str(data.image_size)] * data.spatial_dims)
    device = f"{trainer.accelerator.__class__.__name__.replace('Accelerator', '').lower()} x{trainer.num_devices}"
    if trainer.num_nodes > 1:
        device += f" on each of {trainer.num_nodes} nodes ({trainer.world_size} processes, {config.batch_size} images per batch each)"
    elif trainer.world_size > 1:
        device += f" ({trainer.world_size} processes, {config.batch_size} images per batch each)"
    verb = f"resuming {config.model} at epoch {trainer.current_epoch + 1}" if resume else f"training {config.model}"
    return (f"{verb} on {data.name}: {n['train']} train / {n['val']} val / {n['test']} test images, {size} px, "
            f"{data.in_channels} channel(s), {len(data.class_names)} classes"
            f"{f' (positive: {data.positive_class})' if data.positive_class else ''}; {device}, {precision} precision; "
            f"{config.epochs} epochs of {steps} steps (batch {config.batch_size}) -> {config.out}")


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


def fit_covariates(config: TrainConfig, data: ImageData) -> CovariateSchema | None:
    """The covariate schema of a run, fitted on its training split only (None: no covariates)."""
    train_split = data.splits["train"]
    if not config.uses_covariates or train_split.covariates is None:
        return None
    spec = config.tabular_spec()
    assert spec is not None
    return CovariateSchema.fit(train_split.covariates, spec.missing, spec.join if spec.tabular else None,
                               spec.block_name or None)


def write_data_record(data: ImageData, run_dir: Path, shortcuts: list[dict] | None = None) -> None:
    """``data.json`` (classes, split sizes and origin, excluded files; covariates: their types, missing
    rates per split and the images missing each, the join, shortcut warnings) and ``splits/<split>.csv``."""
    record = {
        "name": data.name, "task": data.task, "class_names": data.class_names,
        "image_size": data.image_size, "in_channels": data.in_channels, "spatial_dims": data.spatial_dims,
        "splits": {
            name: {"n_images": len(split), "origin": data.split_origin.get(name, "given"),
                   "per_class": dict(zip(data.class_names, split.class_counts(data.num_classes)))}
            for name, split in data.splits.items()
        },
        "positive_class": data.positive_class,
        "excluded": [{"path": p, "reason": r} for p, r in data.excluded],
        "source": data.source,
    }
    if data.splits["train"].covariates is not None:
        record["covariates"] = {
            "columns": missing_summary({n: (sp.covariates, sp.paths or []) for n, sp in data.splits.items()}),  # type: ignore[misc]
            "join": data.covariate_join or None,
            "shortcut_warnings": shortcuts or [],
        }
    folder = RunFolder(run_dir)
    write_text_atomic(folder.data_record, json.dumps(record, indent=2))
    if any(split.paths for split in data.splits.values()):
        folder.splits.mkdir(exist_ok=True)
        for name, split in data.splits.items():
            with io.StringIO() as fh:
                writer = csv.writer(fh, lineterminator="\n")
                writer.writerow(["path", "label"])
                for path, label in zip(split.paths or [], split.labels.tolist()):
                    if data.task == "multilabel":  # present findings; unrecorded ones marked with '?'
                        label = ";".join(c + ("?" if v != v else "") for c, v in zip(data.class_names, label) if v != 0)
                        writer.writerow([path, label])
                    else:
                        writer.writerow([path, data.class_names[label]])
                write_text_atomic(folder.splits / f"{name}.csv", fh.getvalue())
