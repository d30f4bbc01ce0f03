"""Per-epoch history: ``history.csv`` in the run folder, and a line per epoch when no progress bar shows."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import lightning as L

COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "time_s"]


class HistoryWriter(L.Callback):
    """Appends one row per finished epoch to ``path`` (kept across ``--resume``)."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.path, self.echo = Path(path), echo
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        m = trainer.callback_metrics
        row = {
            "epoch": trainer.current_epoch + 1,
            "train_loss": _num(m.get("train_loss")),
            "val_loss": _num(m.get("val_loss")),
            "val_auc": _num(m.get("val_auc")),
            "val_acc": _num(m.get("val_acc")),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "time_s": round(time.perf_counter() - self._start, 2),
        }
        new = not self.path.exists()
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self.echo:
            print(
                f"epoch {row['epoch']}/{trainer.max_epochs}  loss {row['train_loss']:.4f}  "
                f"val_auc {row['val_auc']:.4f}  val_acc {row['val_acc']:.4f}  {row['time_s']:.1f}s",
                flush=True,
            )


def _num(value: object) -> float:
    try:
        return round(float(value), 6)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def read_history(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", "nan") else math.nan for k, v in row.items()} for row in csv.DictReader(fh)]
