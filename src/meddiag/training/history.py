"""Per-epoch history: ``history.csv`` in the run folder, and a line per epoch when no progress bar shows."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import lightning as L

from meddiag.runfolder import write_text_atomic

COLUMNS = ["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "time_s"]


class HistoryWriter(L.Callback):
    """Appends one row per finished epoch to ``path`` (kept across ``--resume``)."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.path, self.echo = Path(path), echo
        self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run repeats the epochs after its checkpoint: drop their rows, written before it died.
        if trainer.global_rank == 0 and self.path.exists():
            rows = [r for r in _read_rows(self.path) if int(float(r["epoch"])) <= trainer.current_epoch]
            _write_rows(self.path, rows)

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
        _write_rows(self.path, [*(_read_rows(self.path) if self.path.exists() else []), row])
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


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict]) -> None:
    """The whole history, rewritten atomically (a kill mid-write leaves the previous version)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, out.getvalue())


def read_history(path: Path) -> list[dict[str, float]]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return [{k: float(v) if v not in ("", "nan") else math.nan for k, v in row.items()} for row in csv.DictReader(fh)]
