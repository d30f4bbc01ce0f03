"""``meddiag pretrain``: self-supervised pretraining on a site's own unlabelled images (SimCLR).

SimCLR (Chen et al. 2020): each image is augmented twice, the network (a registered one, its head
removed) and a projection MLP map both views to unit vectors, and the NT-Xent loss pulls each
image's two views together and pushes them from the batch's other images. No library is used:
the maintained SSL libraries (lightly, solo-learn, VISSL) import torchvision, which does not import
beside this project's CPU torch; the method is the loss below and a projection head.

The views are medical-appropriate: rotation, zoom (which crops), shift, brightness, contrast and a
little noise — no colour jitter (grayscale radiographs have no hue) and no horizontal flip unless
asked (``hflip``: anatomy is lateral). The run folder holds ``config.yaml``, ``history.csv`` (loss and
the share of views whose nearest neighbour in the batch is their twin), ``checkpoints/last.ckpt``
(``--resume``), ``weights.pt`` (the network's weights after every epoch: ``--init-weights`` takes
the folder or the file) and ``pretrain.json`` when it has finished.

A pretraining can itself start from weights (``init_weights``: another pretraining folder to pretrain for
longer, a run, a file or a URL, loaded as ``meddiag train --init-weights`` loads them, with the same load
report in ``init_weights.json`` and the same refusal of a partial load): the projection head starts anew,
and the learning rate follows a cosine schedule of its own from its full value. On the chest X-rays, 50 more
epochs from a 50-epoch pretraining brought the loss from 1.95 to 1.62 and fine-tuned worse (1% and 10% of the
labels; docs/benchmarks.md): a better-solved pretext is not by itself better features.
"""

from __future__ import annotations

import json
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

import meddiag
from meddiag.data.files import UnlabelledImages
from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float
from meddiag.errors import ConfigError
from meddiag.models.registry import create_model, get_entry
from meddiag.models.weights import PRETRAIN_META, initialise, kept_stem, resolve_weights
from meddiag.runfolder import RunFolder, write_text_atomic
from meddiag.training.datamodule import epoch_seed
from meddiag.training.run import check_writable, default_batch_size, process_rank, resolve_precision

METHODS = ("simclr",)


def view_augment() -> AugmentConfig:
    """SimCLR's views for medical images: much stronger geometry and intensity changes than training's, no flip.

    Hard enough that the pretext is not solved (a batch's twins are found again 87% of the time, not 99%, on the
    chest X-rays); milder views (rotation 20, zoom 0.35, shift 0.15, brightness 0.3, contrast 0.4, noise 0.03,
    the defaults before 2026-12-07) fine-tuned 0.006 AUC worse at 10% of the labels, and the same geometry with no
    intensity change (a view is then found again by its histogram: twins 99.6%) gained +0.013 over scratch at 1%
    of the labels against these views' +0.024 (docs/benchmarks.md).
    """
    return AugmentConfig(rotation=25, scale=0.5, translate=0.2, brightness=0.4, contrast=0.6, hflip=False)


class PretrainConfig(BaseModel):
    """Everything that defines a pretraining run; ``config.yaml`` of its folder is this, resolved."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    data: str = Field(description="folder, CSV manifest, DICOM tree or MedMNIST name; labels are not used")
    model: str = "resnet18"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    method: Literal["simclr"] = "simclr"
    epochs: int = Field(50, ge=1)
    batch_size: int | None = Field(None, ge=4, description="None: 128 for images, 32 for volumes (fewer for small sets); larger batches give SimCLR more negatives; per process when several share the work")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.2, gt=0, le=1, description="NT-Xent temperature")
    projection_dim: int = Field(128, ge=8)
    noise: float = Field(0.05, ge=0, lt=0.5, description="max standard deviation of Gaussian noise added to each view, on [0, 1] intensities")
    augment: AugmentConfig = Field(default_factory=view_augment)
    image_size: int | None = Field(None, ge=8, description="None: a MedMNIST file's own size, 128 for image files; use the size you will fine-tune at")
    fit: Literal["pad", "stretch"] = "pad"
    window: str | None = None
    volume_index: int | None = Field(None, ge=0)
    volumes: bool = Field(False, description="a folder of volumes (NIfTI, DICOM series): pretrain a 3D network")
    mean: float = 0.5
    std: float = Field(0.5, gt=0)
    seed: int = 0
    cache: str = Field("auto", description="where files, once decoded and prepared, are kept for later runs: auto ($MEDDIAG_CACHE/prepared), off, or a folder")
    memory_mb: int = Field(1024, ge=0, description="prepared images up to this many MiB are held in memory; more are read from the cache as training uses them")
    init_weights: str | None = Field(None, description="start from these weights: another pretraining folder (to pretrain for longer), a run, a file (.pt/.pth/.bin/.safetensors/.ckpt) or an http(s) URL (URL#sha256=<hex> is verified)")
    allow_partial: bool = Field(False, description="accept initial weights that fill less than 90% of the network's tensors")
    accelerator: str = "auto"
    devices: int | str = Field("auto", description="devices per node (GPUs, or CPU processes): a number, or auto")
    num_nodes: int = Field(1, ge=1, description="machines the pretraining spans (Lightning: torchrun, SLURM or its own launcher)")
    precision: str = "auto"
    out: str | None = None

    @classmethod
    def from_sources(cls, config_file: str | Path | None = None, **overrides: Any) -> PretrainConfig:
        from meddiag.training.config import read_yaml

        values: dict[str, Any] = dict(read_yaml(config_file)) if config_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid pretraining configuration: {problems}") from None


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SimCLR's NT-Xent loss of two (N, D) batches of projections (row i of each: views of image i), and
    the share of the 2N views whose most similar other view is their twin. Under DDP the batches given are
    every process's (:func:`global_batch`), so the negatives are those of the whole batch."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # a view is not its own negative
    twin = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    loss = F.cross_entropy(sim, twin)
    accuracy = (sim.argmax(dim=1) == twin).float().mean()
    return loss, accuracy


def global_batch(z: torch.Tensor) -> torch.Tensor:
    """Every process's projections, this process's among them, in rank order (as SimCLR does on many devices);
    ``z`` itself in a run of one process. Each process then computes the loss of the whole batch, and the gather
    passes the gradients back to the process whose images made them, summed over the processes; DDP averages
    the processes' gradients, so several processes of batch B learn as one process of batch B x processes would
    (but for batch norm: per process on CPUs, synchronised across GPUs, :func:`synchronised_batch_norm`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z))


def encoder_of(model_name: str, in_channels: int, spatial_dims: int, image_size: int, model_kwargs: dict) -> tuple[nn.Module, int]:
    """A registered network with its head (final linear layer) replaced by the identity, and the width of its features."""
    entry = get_entry(model_name)
    if not entry.head:
        raise ConfigError(f"model {model_name} names no final linear layer, so it cannot be pretrained (its features are unknown)")
    net = create_model(model_name, in_channels, 2, spatial_dims, image_size, **model_kwargs)
    width = net.get_submodule(entry.head).in_features
    net.set_submodule(entry.head, nn.Identity())
    return net, width


class ImagesOnly(torch.utils.data.Dataset):
    """(image,) of uint8 images (N, C, *spatial): a tensor, or images read from the cache as they are used."""

    def __init__(self, images: Any) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (self.images[i],)


class SimCLRModule(L.LightningModule):
    def __init__(self, model_name: str, model_kwargs: dict, in_channels: int, spatial_dims: int, image_size: int,
                 mean: float, std: float, augment: dict, noise: float, temperature: float, projection_dim: int,
                 optim: dict, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder, width = encoder_of(model_name, in_channels, spatial_dims, image_size, model_kwargs)
        # SimCLR's projection head: Linear-BN-ReLU-Linear (the batch norm speeds small-batch training up: measured, loss
        # 4.40 vs 4.59 after 80 steps of 128 PneumoniaMNIST images)
        self.projector = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                       nn.Linear(width, projection_dim))
        self.augment = AugmentConfig.model_validate(augment)
        self._seeded_epoch = -1

    def _seed_epoch(self) -> None:
        if self._seeded_epoch == self.current_epoch:
            return
        self._seeded_epoch = self.current_epoch
        seed = epoch_seed(self.hparams.seed, self.current_epoch) + self.global_rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        v = augment_batch(x, self.augment)
        if self.hparams.noise > 0:
            sigma = torch.rand((len(v),) + (1,) * (v.ndim - 1), device=v.device) * self.hparams.noise
            v = (v + torch.randn_like(v) * sigma).clamp_(0, 1)
        v = normalize(v, self.hparams.mean, self.hparams.std)
        return v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._seed_epoch()
        x = to_unit_float(batch[0])
        z1 = self.projector(self.encoder(self.view(x)).flatten(1))
        z2 = self.projector(self.encoder(self.view(x)).flatten(1))
        loss, accuracy = nt_xent(global_batch(z1), global_batch(z2), self.hparams.temperature)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log("twin_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> Any:
        o = self.hparams.optim
        opt = torch.optim.AdamW(self.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["epochs"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class WeightsWriter(L.Callback):
    """After every epoch: ``weights.pt`` (the encoder, atomically) and a row of ``history.csv``."""

    def __init__(self, folder: RunFolder, meta: dict, echo: bool) -> None:
        self.folder, self.meta, self.echo = folder, meta, echo
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        epoch = trainer.current_epoch + 1
        m = trainer.callback_metrics
        seconds = time.perf_counter() - self._start
        save_pretrained(self.folder.pretrained_weights, pl_module.encoder, {**self.meta, "epochs": epoch})  # type: ignore[arg-type]
        rows = self.folder.history.read_text().splitlines()[1:] if self.folder.history.exists() else []
        rows = [r for r in rows if int(r.split(",")[0]) < epoch]
        rows.append(f"{epoch},{float(m.get('train_loss', float('nan'))):.6f},{float(m.get('twin_acc', float('nan'))):.6f},"
                    f"{trainer.optimizers[0].param_groups[0]['lr']:.6g},{seconds:.2f}")
        write_text_atomic(self.folder.history, "epoch,train_loss,twin_acc,lr,time_s\n" + "\n".join(rows) + "\n")
        if self.echo:
            print(f"epoch {epoch}/{trainer.max_epochs}  loss {float(m.get('train_loss', 0)):.4f}  "
                  f"twin_acc {float(m.get('twin_acc', 0)):.3f}  {seconds:.1f}s", file=sys.stderr, flush=True)


def synchronised_batch_norm(accelerator: str) -> bool:
    """Whether the batch norms average their statistics over every process's images (SimCLR's "global BN":
    a process's own batch statistics would let its twins find each other through them). PyTorch synchronises
    batch norm on GPUs only, so on CPU processes each keeps its own; on one device it changes nothing."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def save_pretrained(path: Path, encoder: nn.Module, meta: dict) -> None:
    """``weights.pt``: the encoder's tensors (a registered network's names, no head) and what made them."""
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": state, PRETRAIN_META: meta}, tmp)
    tmp.replace(path)


def start_from(encoder: nn.Module, config: PretrainConfig, weights: Any, image_size: int, folder: RunFolder,
               announce: bool) -> dict:
    """Load ``weights`` into the encoder (refusing a partial load), print the load report and keep it in
    ``init_weights.json``; returns what the weights file records of them: the report's summary and, when they
    come from another SimCLR pretraining of this network, its epochs (``epochs_before``: the total is the sum)."""
    loaded = initialise(encoder, config.model, weights, allow_partial=config.allow_partial, image_size=image_size,
                        model_kwargs=config.model_kwargs)
    source = loaded.source.get("pretraining") or {}  # what a meddiag pretraining's weights file says of itself
    same = source.get("method") == config.method and source.get("model") == config.model
    before = int(source.get("epochs") or 0) + int(source.get("epochs_before") or 0) if same else 0
    if announce:
        print(loaded.text(), file=sys.stderr, flush=True)
        if before:
            print(f"continuing a {config.method} pretraining of {before} epochs: {config.epochs} more (a new projection "
                  "head; the learning rate starts again from its full value)", file=sys.stderr, flush=True)
        write_text_atomic(folder.init_weights, json.dumps({**loaded.to_dict(), "summary": loaded.summary(),
                                                           "epochs_before": before}, indent=2))
    return {"init_weights": loaded.summary(), "epochs_before": before}


def pretrain(config: PretrainConfig, *, resume: bool = False, progress: bool | None = None,
             images: UnlabelledImages | None = None) -> Path:
    """Pretrain ``config.model`` on ``config.data`` without labels; returns the run folder (its ``weights.pt``
    is what ``--init-weights`` takes). ``resume`` continues the folder ``config.out`` from its last epoch."""
    from meddiag.data.unlabelled import load_unlabelled

    get_entry(config.model)
    progress = sys.stderr.isatty() if progress is None else progress
    # Under DDP, Lightning re-runs this command once per extra process (torchrun and SLURM start them all): the
    # others find the folder made by process 0 and join it; only process 0 writes it (as meddiag train does)
    first = process_rank() == 0
    stem = Path(config.data.rstrip("/\\")).name or config.data
    run_dir = Path(config.out) if config.out else Path("runs") / f"pretrain-{stem}-{config.model}"
    folder = RunFolder(run_dir)
    last = folder.resume_checkpoint
    if resume and not last.exists():
        raise ConfigError(f"cannot resume: {last} does not exist" + (" (the pretraining has finished)" if (run_dir / "pretrain.json").exists() else ""))
    if first and not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"folder {run_dir} already exists; pass --resume to continue it or choose another --out")
    if first:
        check_writable(run_dir)
    # a weights file or URL is found (downloaded) before the images are read: a wrong path fails in seconds
    weights = resolve_weights(config.init_weights, progress=progress) if config.init_weights and not resume else None
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = images or load_unlabelled(config.data, image_size=config.image_size, fit=config.fit, window=config.window,
                                     volume_index=config.volume_index, volumes=config.volumes, progress=progress and first,
                                     cache=config.cache, memory_mb=config.memory_mb)
    n = len(data.images)
    batch = config.batch_size or default_batch_size(n, data.spatial_dims)
    if n < 2 * min(batch, 8):
        raise ConfigError(f"{config.data}: {n} images are too few to pretrain on (SimCLR contrasts the images of a batch)")
    batch = min(batch, n)
    config = config.model_copy(update={"image_size": data.image_size, "out": str(run_dir), "batch_size": batch})
    if weights is not None and "stem" not in config.model_kwargs:
        # weights learned with another stem than this size would choose keep theirs (as meddiag train does)
        stem = kept_stem(weights, config.model, data.spatial_dims, data.image_size)
        if stem:
            config = config.model_copy(update={"model_kwargs": {**config.model_kwargs, "stem": stem}})
    if first:
        write_text_atomic(folder.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    module = SimCLRModule(config.model, config.model_kwargs, data.in_channels, data.spatial_dims, data.image_size,
                          config.mean, config.std, config.augment.model_dump(), config.noise, config.temperature,
                          config.projection_dim, {"lr": config.lr, "weight_decay": config.weight_decay, "epochs": config.epochs},
                          config.seed)
    meta = {"method": config.method, "model": config.model, "model_kwargs": config.model_kwargs, "images": n,
            "image_size": data.image_size, "in_channels": data.in_channels, "spatial_dims": data.spatial_dims,
            "data": config.data, "temperature": config.temperature, "meddiag_version": meddiag.__version__}
    if weights is not None:
        # one report, printed and written once, when a launcher has started a process per device
        meta.update(start_from(module.encoder, config, weights, data.image_size, folder, announce=first))
    elif resume and folder.init_weights.exists():
        report = json.loads(folder.init_weights.read_text())
        meta.update({"init_weights": report.get("summary"), "epochs_before": report.get("epochs_before", 0)})
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(ImagesOnly(data.images), batch_size=batch, shuffle=True,
                                         drop_last=True, generator=generator)
    precision = resolve_precision(config.precision, config.accelerator, data.spatial_dims)
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
        precision=precision, sync_batchnorm=synchronised_batch_norm(config.accelerator),
        callbacks=[WeightsWriter(folder, meta, echo=not progress),
                   ModelCheckpoint(dirpath=folder.checkpoints, filename=last.stem, monitor=None, save_top_k=1,
                                   save_on_train_epoch_end=True, enable_version_counter=False)],
        logger=False, default_root_dir=run_dir, enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )
    world = trainer.world_size
    if n < batch * world:
        raise ConfigError(f"{config.data}: {n} images fill no batch of {batch} on each of {world} processes; give a smaller "
                          "--batch-size (it is per process)")
    if trainer.is_global_zero:
        size = "x".join([str(data.image_size)] * data.spatial_dims)
        batches = f"batch {batch}" if world == 1 else f"batch {batch * world}: {batch} on each of {world} processes"
        print(f"{'resuming' if resume else 'pretraining'} {config.model} with {config.method} on {data.note}: {n} images, {size} px, "
              f"{data.in_channels} channel(s); {config.epochs} epochs of {n // (batch * world)} steps ({batches}), {precision} "
              f"-> {run_dir}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
        warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=last if resume else None)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero and not trainer.interrupted:
        epoch_times = [float(r.split(",")[-1]) for r in folder.history.read_text().splitlines()[1:]]
        write_text_atomic(run_dir / "pretrain.json", json.dumps(
            {"finished": True, "epochs": trainer.current_epoch, "epochs_before": meta.get("epochs_before", 0), "images": n,
             "train_seconds": round(seconds, 1),
             "seconds_per_epoch": round(sum(epoch_times) / max(1, len(epoch_times)), 1),
             "excluded": [{"path": p, "reason": r} for p, r in data.excluded]}, indent=2))
        last.unlink(missing_ok=True)
        print(f"pretrained weights: {folder.pretrained_weights}  (meddiag train DATA --model {config.model} "
              f"--init-weights {run_dir})", file=sys.stderr, flush=True)
    return run_dir
