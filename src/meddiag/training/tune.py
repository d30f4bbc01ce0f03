"""Hyper-parameter search with Optuna: which model, how wide, which learning rate, weight decay,
augmentation strength and image size, chosen by experiment on the validation split.

- Seeded TPE sampler (the same seed proposes the same first trials), median pruning on the
  validation AUC reported after every epoch, and SQLite storage (``OUT/study.db``): running the
  same command again resumes the study and adds trials. A trial whose process was killed stops
  sending its heartbeat; when the study resumes more than :data:`GRACE_S` seconds later, that trial
  is marked failed and its configuration is tried again (Optuna's stale-trial retry). One study is
  meant for one process at a time.
- Each trial is a normal training run (``OUT/trial-NNN/``) that never looks at the test split.
- ``OUT/best.yaml`` is the best trial's configuration; ``meddiag train --config OUT/best.yaml``
  trains it (and evaluates on test, once). ``OUT/trials.csv`` lists every trial.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from meddiag.data.dataset import ImageData
from meddiag.errors import ConfigError
from meddiag.models.registry import get_entry
from meddiag.training.config import TrainConfig
from meddiag.training.run import load_training_data, train

log = logging.getLogger("meddiag")
SEED_CNN_WIDTHS = (8, 16, 32, 64)  # first convolution's filters; the next two have 2x and 4x
SEED_CNN_DENSE = (64, 128, 256, 512)
HEARTBEAT_S, GRACE_S = 5, 15  # a running trial's heartbeat; a trial silent this long was killed


@dataclass
class SearchSpace:
    """What the search may change; everything else comes from the base configuration."""

    models: list[str] = field(default_factory=lambda: ["seed_cnn", "resnet18"])
    image_sizes: list[int] = field(default_factory=list)  # empty: the base configuration's (or the data's own)
    lr: tuple[float, float] = (1e-4, 1e-2)  # log-uniform
    weight_decay: tuple[float, float] = (1e-6, 1e-2)  # log-uniform
    augment: tuple[float, float] = (0.0, 2.0)  # strength: multiplies the default augmentation ranges

    def check(self) -> None:
        for m in self.models:
            get_entry(m)
        if not self.models:
            raise ConfigError("the search needs at least one model")


def suggest(trial: Any, base: TrainConfig, space: SearchSpace) -> TrainConfig:
    """The configuration ``trial`` proposes (Optuna's define-by-run)."""
    model = trial.suggest_categorical("model", space.models)
    update: dict[str, Any] = {"model": model, "model_kwargs": {}}
    if model == "seed_cnn":
        w = trial.suggest_categorical("seed_cnn_width", SEED_CNN_WIDTHS)
        update["model_kwargs"] = {"widths": [w, 2 * w, 4 * w], "dense": trial.suggest_categorical("seed_cnn_dense", SEED_CNN_DENSE)}
    update["lr"] = trial.suggest_float("lr", *space.lr, log=True)
    update["weight_decay"] = trial.suggest_float("weight_decay", *space.weight_decay, log=True)
    strength = trial.suggest_float("augment", *space.augment)
    default = type(base.augment)()
    update["augment"] = base.augment.model_copy(update={
        "enabled": strength > 0,
        **{k: min(getattr(default, k) * strength, limit) for k, limit in
           (("rotation", 180.0), ("scale", 0.9), ("translate", 0.9), ("brightness", 0.9), ("contrast", 0.9))},
    })
    if len(space.image_sizes) > 1:
        update["image_size"] = trial.suggest_categorical("image_size", space.image_sizes)
    elif space.image_sizes:
        update["image_size"] = space.image_sizes[0]
    return base.model_copy(update=update)


class PruneOnValAUC(L.Callback):
    """Reports the validation AUC to the Optuna trial after each epoch and stops the trial when
    the pruner says it is worse than the median of earlier trials at the same epoch."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.epoch = 0  # epochs reported

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after the epoch's validation: the module logs val_auc only after callbacks' on_validation_epoch_end
        import optuna

        value = trainer.callback_metrics.get("val_auc")
        if value is None:
            return
        self.trial.report(float(value), step=self.epoch)
        self.epoch += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"val AUC {float(value):.4f} at epoch {self.epoch}")


@dataclass
class TuneResult:
    out: Path
    best_value: float
    best_params: dict
    best_config: Path
    n_trials: int
    n_pruned: int


def tune(base: TrainConfig, out: str | Path, trials: int, timeout: float | None = None, space: SearchSpace | None = None,
         seed: int = 0, keep_runs: bool = False, progress: bool = False) -> TuneResult:
    """Run ``trials`` more trials (or until ``timeout`` seconds) of the study in ``out``."""
    import optuna

    space = space or SearchSpace()
    space.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{out / 'study.db'}", heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
    study = optuna.create_study(
        study_name="meddiag", storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed + len_trials(out)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    )
    datasets: dict[int | None, ImageData] = {}

    def objective(trial: optuna.Trial) -> float:
        config = suggest(trial, base, space)
        size = config.image_size
        if size not in datasets:
            datasets[size] = load_training_data(config, progress=False)
        run_dir = out / f"trial-{trial.number:03d}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config = config.model_copy(update={"out": str(run_dir)})
        try:
            result = train(config, progress=progress, data=datasets[size], callbacks=[PruneOnValAUC(trial)])
        finally:
            if not keep_runs:
                for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
                    ckpt.unlink()  # the search keeps configurations and histories, not weights
        if result.val_auc is None or math.isnan(result.val_auc):
            raise optuna.TrialPruned("no validation AUC")
        trial.set_user_attr("minutes", result.train_seconds / 60)
        return float(result.val_auc)

    study.optimize(objective, n_trials=trials, timeout=timeout, catch=())
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"no trial of the study in {out} completed")
    best = study.best_trial
    best_config = out / "best.yaml"
    winner = suggest(optuna.trial.FixedTrial(best.params), base, space).model_copy(update={"out": None})
    winner.to_yaml(best_config)
    write_trials(study, out / "trials.csv")
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    return TuneResult(out, float(best.value), dict(best.params), best_config, len(study.trials), pruned)


def len_trials(out: Path) -> int:
    """Trials already in the study (0 for a new one): resumed studies seed their sampler past them,
    so a resumed search proposes new points rather than repeating its first ones."""
    import optuna

    db = out / "study.db"
    if not db.exists():
        return 0
    try:
        return len(optuna.load_study(study_name="meddiag", storage=f"sqlite:///{db}").trials)
    except KeyError:
        return 0


def write_trials(study: Any, path: Path) -> None:
    names = sorted({k for t in study.trials for k in t.params})
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["trial", "state", "val_auc", "epochs", "minutes", *names])
        for t in study.trials:
            epochs = max(t.intermediate_values) + 1 if t.intermediate_values else ""
            minutes = t.user_attrs.get("minutes", (t.duration.total_seconds() / 60) if t.duration else "")
            writer.writerow([t.number, t.state.name.lower(), "" if t.value is None else f"{t.value:.4f}", epochs,
                             f"{minutes:.2f}" if minutes != "" else "", *[t.params.get(n, "") for n in names]])
