"""The LightningModule: the science of training (model, loss, metrics), nothing of devices."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from torchmetrics import AUROC, Accuracy, MeanMetric

from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float
from meddiag.models.checkpoint import META_KEY, ModelCard
from meddiag.models.fusion import call, withhold_at_random
from meddiag.models.inference import logits_to_probs
from meddiag.training.datamodule import epoch_seed
from meddiag.training.finetune import (FineTuning, backbone_norms, freeze_for_good, lr_factors, set_norms_frozen,
                                       split_parameters)
from meddiag.training.losses import DiagnosisLoss


EMA_PREFIX = "ema.module."


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after ``step`` optimiser steps: ``min(decay, (1 + step) / (10 + step))``.

    The warm-up keeps the average from dragging the random initial weights along: early on it
    spans about the last tenth of the steps taken, later at most ``1 / (1 - decay)`` steps.
    """
    return min(decay, (1 + step) / (10 + step))


class DiagnosisModule(L.LightningModule):
    """Trains ``card``'s network; logs ``train_loss``, ``val_loss``, ``val_auc``, ``val_acc``.

    With ``ema_decay`` > 0 it keeps an exponential moving average of the weights (and of the
    batch-norm statistics) over the optimiser steps; validation, and so checkpoint selection and
    early stopping, use the averaged weights, and every checkpoint stores them as the model's
    weights. The weights being trained stay in the checkpoint under ``ema.module.*`` (for
    ``--resume`` only). Every checkpoint carries the model card, so it is self-sufficient.
    """

    def __init__(self, card: dict[str, Any], optim: dict[str, Any], augment: dict[str, Any],
                 loss: dict[str, Any] | None = None, ema_decay: float = 0.0, seed: int = 0,
                 covariate_dropout: float = 0.0, finetune: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.seed, self._seeded_epoch = seed, -1
        self.save_hyperparameters()
        self.card = ModelCard.model_validate(card)
        self.model = self.card.build_model()
        self.ema_decay = ema_decay
        self.ema: AveragedModel | None = None
        if ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=self._ema_update, use_buffers=True)
            self.ema.requires_grad_(False)  # updated by hand; DDP must not expect gradients for it
        self.loss_fn = DiagnosisLoss(self.card.task, **(loss or {}))
        self.augment = AugmentConfig.model_validate(augment)
        self.optim = optim
        task, k = self.card.task, self.card.num_classes
        if task == "binary":
            self.val_auc, self.val_acc = AUROC(task="binary"), Accuracy(task="binary", threshold=self.card.threshold)
        elif task == "multiclass":
            self.val_auc, self.val_acc = AUROC(task="multiclass", num_classes=k), Accuracy(task="multiclass", num_classes=k)
        else:
            # Unknown findings (NaN, sent as -1) are left out of the metrics, as of the loss.
            self.val_auc = AUROC(task="multilabel", num_labels=k, ignore_index=-1)
            self.val_acc = Accuracy(task="multilabel", num_labels=k, threshold=self.card.threshold, ignore_index=-1)
        self.val_loss = MeanMetric()
        self.covariate_dropout = covariate_dropout
        self.finetune = FineTuning(**finetune) if finetune else None
        self.backbone: set[str] = set()  # parameters the initial weights filled (see use_backbone)
        self._backbone_norms: list[torch.nn.Module] = []
        schema = self.card.covariates
        self.covariate_blocks = [torch.tensor(ix) for ix in schema.block_features().values()] if schema else []

    def forward(self, x: torch.Tensor, covariates: torch.Tensor | None = None) -> torch.Tensor:
        return call(self.model, x, covariates)

    def use_backbone(self, names: list[str]) -> None:
        """Declare the parameters initial weights filled (the backbone), before training starts: fine-tuning
        (freezing, its own learning rate) applies to them; the rest is the head."""
        self.backbone = set(names)
        self._backbone_norms = backbone_norms(self.model, self.backbone)
        if self.finetune is not None and self.finetune.frozen_for_good:
            freeze_for_good(self.model, self.backbone)
        if self.ema is not None:  # the average starts from the loaded weights
            self.ema.module.load_state_dict(self.model.state_dict())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning puts the model in training mode each epoch: a frozen backbone's norms go back to eval.
        if self.finetune is not None and self._backbone_norms:
            frozen = self.finetune.frozen_for_good or self.current_epoch < self.finetune.freeze_epochs
            set_norms_frozen(self._backbone_norms, frozen)

    def _seed_epoch(self) -> None:
        """Augmentation and dropout draw from the global generators: seeding them before an epoch's
        first training batch is augmented makes the epoch's randomness independent of what ran
        before it, so a resumed run repeats it exactly. (Not in on_train_epoch_start: Lightning skips
        that hook for the first epoch after resuming from an end-of-epoch checkpoint.)"""
        if self._seeded_epoch == self.current_epoch:
            return
        self._seeded_epoch = self.current_epoch
        seed = epoch_seed(self.seed, self.current_epoch) + self.global_rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def setup(self, stage: str) -> None:
        if self.card.spatial_dims == 2:  # channels-last convolutions are faster on CPU and GPU
            self.model.to(memory_format=torch.channels_last)
            if self.ema is not None:
                self.ema.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def _ema_update(self, averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: Any) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(int(n_averaged), self.ema_decay))
        else:  # counters (batch norm's num_batches_tracked) follow the model
            torch._foreach_copy_(averaged, current)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The network that validation (and so checkpoint selection) judges: the average, if kept."""
        return self.ema.module if self.ema is not None else self.model

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, covariates, labels = batch if len(batch) == 3 else (batch[0], None, batch[1])
        x = to_unit_float(images)
        if self.trainer is not None and self.trainer.training:
            self._seed_epoch()
            x = augment_batch(x, self.augment)
            if covariates is not None and self.covariate_dropout > 0:
                covariates = withhold_at_random(covariates, self.model.missing_row, self.covariate_blocks, self.covariate_dropout)
        x = normalize(x, self.card.mean, self.card.std)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, covariates, labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, c, y = batch
        loss = self.loss(self(x, c), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x), sync_dist=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, c, y = batch
        logits = call(self.eval_model, x, c)
        self.val_loss.update(self.loss(logits, y), weight=len(x))
        probs = logits_to_probs(logits.float(), self.card.task)
        scores = probs[:, 1] if self.card.task == "binary" else probs
        if self.card.task == "multilabel":
            target = torch.where(torch.isfinite(y), y, torch.full_like(y, -1)).long()
        else:
            target = y.long()
        self.val_auc.update(scores, target)
        self.val_acc.update(scores, target)

    def on_validation_epoch_end(self) -> None:
        self.log("val_loss", self.val_loss.compute(), prog_bar=False)
        self.log("val_auc", self.val_auc.compute(), prog_bar=True)
        self.log("val_acc", self.val_acc.compute(), prog_bar=True)
        for metric in (self.val_loss, self.val_auc, self.val_acc):
            metric.reset()

    def configure_optimizers(self) -> Any:
        o = self.optim
        if self.finetune is not None:
            return self._finetune_optimizers()
        opt = self._make_optimizer(self.model.parameters())
        epochs = o["epochs"]
        if o["scheduler"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        elif o["scheduler"] == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2), max(1, epochs * 3 // 4)], gamma=0.1)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        o = self.optim
        if o["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=o["lr"], momentum=0.9, weight_decay=o["weight_decay"], nesterov=True)
        if o["optimizer"] == "adam":
            return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])

    def _finetune_optimizers(self) -> Any:
        """Two parameter groups (head, backbone) and a per-step schedule: warm-up, the backbone frozen for
        its epochs and at its learning-rate multiple (see :mod:`meddiag.training.finetune`)."""
        assert self.finetune is not None
        head, body = split_parameters(self.model, self.backbone)
        epochs = self.optim["epochs"]
        steps = max(1, int(self.trainer.estimated_stepping_batches) // max(1, epochs)) if self._trainer is not None else 1
        head_factor, body_factor = lr_factors(self.finetune, epochs, steps, self.optim["scheduler"])
        groups, factors = [{"params": head}], [head_factor]
        trainable_body = [p for p in body if p.requires_grad]
        if trainable_body:
            groups.append({"params": trainable_body})
            factors.append(body_factor)
        opt = self._make_optimizer(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=factors)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.card.model_dump()
        if self.ema is not None:  # the averaged weights are the model; the trained ones go aside
            _swap_ema(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is None:
            return
        state = checkpoint["state_dict"]
        if any(k.startswith(EMA_PREFIX) for k in state):
            _swap_ema(state)
        else:  # a run made before weight averaging existed: the average starts from its weights
            for key in [k for k in state if k.startswith("model.")]:
                state[EMA_PREFIX + key[len("model."):]] = state[key].clone()
            state["ema.n_averaged"] = torch.tensor(0)


def _swap_ema(state: dict[str, torch.Tensor]) -> None:
    """Exchange ``model.*`` and ``ema.module.*`` entries of a state dict, in place."""
    for key in [k for k in state if k.startswith(EMA_PREFIX)]:
        own = "model." + key[len(EMA_PREFIX):]
        state[key], state[own] = state[own], state[key]
