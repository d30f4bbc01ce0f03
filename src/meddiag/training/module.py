"""The LightningModule: the science of training (model, loss, metrics), nothing of devices."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import AUROC, Accuracy, MeanMetric

from meddiag.data.transforms import AugmentConfig, augment_batch, normalize, to_unit_float
from meddiag.models.checkpoint import META_KEY, ModelCard
from meddiag.models.inference import logits_to_probs
from meddiag.training.losses import DiagnosisLoss


class DiagnosisModule(L.LightningModule):
    """Trains ``card``'s network; logs ``train_loss``, ``val_loss``, ``val_auc``, ``val_acc``.

    Every checkpoint it writes carries the model card, so it is self-sufficient.
    """

    def __init__(self, card: dict[str, Any], optim: dict[str, Any], augment: dict[str, Any],
                 loss: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.card = ModelCard.model_validate(card)
        self.model = self.card.build_model()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        if self.card.spatial_dims == 2:  # channels-last convolutions are faster on CPU and GPU
            self.model.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        x = to_unit_float(images)
        if self.trainer is not None and self.trainer.training:
            x = augment_batch(x, self.augment)
        x = normalize(x, self.card.mean, self.card.std)
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
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
        params = self.model.parameters()
        if o["optimizer"] == "sgd":
            opt = torch.optim.SGD(params, lr=o["lr"], momentum=0.9, weight_decay=o["weight_decay"], nesterov=True)
        elif o["optimizer"] == "adam":
            opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        else:
            opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        epochs = o["epochs"]
        if o["scheduler"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        elif o["scheduler"] == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, epochs // 2), max(1, epochs * 3 // 4)], gamma=0.1)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[META_KEY] = self.card.model_dump()
