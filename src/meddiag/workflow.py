"""Workflows that span stages: train then evaluate; K-fold cross-validation."""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from meddiag.data.dataset import ImageData, Split
from meddiag.data.splits import stratification_key, stratified_group_folds
from meddiag.errors import ConfigError
from meddiag.evaluation.decision import tune_decision
from meddiag.evaluation.evaluate import evaluate_run, evaluate_split
from meddiag.evaluation.metrics import classification_metrics, json_safe
from meddiag.explain.examples import write_example_heatmaps
from meddiag.models.checkpoint import load_checkpoint, save_checkpoint
from meddiag.models.ensemble import check_members
from meddiag.runfolder import RunFolder, model_checkpoint, write_text_atomic
from meddiag.training.config import TrainConfig
from meddiag.training.ood import fit_ood
from meddiag.training.run import TrainResult, default_run_dir, load_training_data, train


@dataclass
class TrainEvalResult:
    train: TrainResult
    test_metrics: dict | None  # None in the extra processes of a multi-device run

    def summary(self) -> str:
        m, t = self.test_metrics or {}, self.train
        lo, hi = m.get("auc_ci") or (float("nan"), float("nan"))
        return (f"test AUC {m['auc']:.4f} (95% CI {lo:.3f}-{hi:.3f})  ACC {m['acc']:.4f}  in {t.train_seconds / 60:.1f} min  "
                f"-> {t.run_dir}  (report: {t.run_dir / 'report.html'})")


def train_and_evaluate(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainEvalResult:
    """Train as ``config`` says, then evaluate the best checkpoint on the test split."""
    result = train(config, resume=resume, progress=progress)
    if not result.is_global_zero:  # one process evaluates and writes; the others are done
        return TrainEvalResult(result, None)
    settle_decision(result.best_checkpoint, result.data.splits["val"], config)
    settle_ood(result.best_checkpoint, result.data, config)
    model, card = load_checkpoint(result.best_checkpoint)
    try:
        write_example_heatmaps(model, card, result.data.splits["test"], RunFolder(result.run_dir).example_heatmaps)
    except Exception as exc:  # noqa: BLE001 - a figure of the report must never cost a trained run its evaluation
        warnings.warn(f"the report's example heatmaps could not be drawn: {exc.__class__.__name__}: {exc}", stacklevel=2)
    metrics = evaluate_run(result.run_dir, data=result.data, split="test", progress=bool(progress))
    if config.loggers:
        from meddiag.training.loggers import log_results

        log_results(config.loggers, result.run_dir, metrics, step=config.epochs)
    return TrainEvalResult(result, metrics)


def settle_decision(checkpoint: Path, val: Split, config: TrainConfig) -> None:
    """Temperature and threshold chosen on validation, when the configuration asks for them."""
    if config.calibrate or config.operating_point or config.coverage:
        tune_decision(checkpoint, val, calibrate=config.calibrate, operating_point=config.operating_point,
                      coverage=config.coverage)


def settle_ood(checkpoint: Path, data: ImageData, config: TrainConfig) -> None:
    """The out-of-distribution rule: reference from the training split, threshold from validation."""
    if config.ood_keep is not None:
        fit_ood(checkpoint, data, config.ood_keep, config.ood_method)


@dataclass
class CrossValidationResult:
    run_dir: Path
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        auc, test = m["per_fold_val"]["auc"], m["per_fold_test"]["auc"]
        return (f"{m['folds']}-fold CV: out-of-fold AUC {m['pooled_out_of_fold']['auc']:.4f}  "
                f"(folds {auc['mean']:.4f} +/- {auc['std']:.4f}); test AUC {test['mean']:.4f} +/- {test['std']:.4f}  -> {self.run_dir}")


def cross_validate(config: TrainConfig, *, progress: bool | None = None) -> CrossValidationResult:
    """K-fold cross-validation (K = ``config.folds``) over the training and validation images.

    Folds are stratified by class and keep each patient whole. Fold k trains on the other folds,
    selects its checkpoint on fold k and is evaluated on fold k and on the untouched test split.
    Writes ``RUN/fold-k/`` (a full run folder each) and ``RUN/cv_metrics.json``: metrics of the
    pooled out-of-fold predictions, and the mean and standard deviation over folds.
    """
    k = config.folds
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    data = load_training_data(config, bool(progress))
    pool = Split.concat([data.splits["train"], data.splits["val"]])
    fold_of = stratified_group_folds(stratification_key(pool.labels.numpy()), k, config.seed, pool.groups)
    oof = np.zeros((len(pool), data.num_classes))
    per_val, per_test = [], []
    for fold in range(k):
        held = np.flatnonzero(fold_of == fold)
        fold_data = replace(
            data,
            splits={"train": pool.subset(np.flatnonzero(fold_of != fold)), "val": pool.subset(held), "test": data.splits["test"]},
            split_origin={"train": f"folds other than {fold + 1} of {k}", "val": f"fold {fold + 1} of {k}",
                          "test": data.split_origin.get("test", "given")},
        )
        fold_config = config.model_copy(update={"out": str(run_dir / f"fold-{fold + 1}"), "folds": 1})
        result = train(fold_config, progress=progress, data=fold_data)
        if not result.is_global_zero:
            continue
        settle_decision(result.best_checkpoint, fold_data.splits["val"], fold_config)
        settle_ood(result.best_checkpoint, fold_data, fold_config)
        per_test.append(evaluate_run(result.run_dir, data=fold_data, split="test", progress=False))
        model, card = load_checkpoint(result.best_checkpoint)
        metrics, probs = evaluate_split(model, card, fold_data.splits["val"])
        per_val.append(metrics)
        oof[held] = probs
    card_threshold = config.threshold
    pooled = classification_metrics(pool.labels.numpy(), oof, data.task, data.class_names, card_threshold)
    summary = {
        "folds": k, "data": data.name, "n_images_pooled": len(pool), "grouped_by_patient": pool.groups is not None,
        "pooled_out_of_fold": pooled,
        "per_fold_val": _spread(per_val), "per_fold_test": _spread(per_test),
        "fold_runs": [str(run_dir / f"fold-{i + 1}") for i in range(k)],
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "cv_metrics.json", json.dumps(json_safe(summary), indent=2))
    return CrossValidationResult(run_dir, summary)


def _spread(per_fold: list[dict]) -> dict:
    out = {}
    for key in ("auc", "acc", "balanced_acc"):
        values = [m[key] for m in per_fold if m.get(key) is not None]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
    return out


def make_ensemble(runs: list[Path], out: Path, *, operating_point: str | None = None, calibrate: bool = False,
                  coverage: float | None = None, tta: int = 0, progress: bool = False) -> dict:
    """An ensemble run folder at ``out`` from trained runs: one checkpoint averaging the members'
    probabilities, the members' data definition (they must share data and splits, or one member's
    test images could be another's training images), then its evaluation and report like any run.
    Returns the test metrics."""
    import shutil

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"run folder {out} already exists; choose another --out")
    if len(runs) < 2:
        raise ConfigError("an ensemble needs at least two runs")
    loaded = [load_checkpoint(model_checkpoint(r)) for r in runs]
    cards = [card for _, card in loaded]
    check_members(cards)
    homes = [RunFolder.of(r) for r in runs]
    configs = []
    for home in homes:
        if not home.config.exists():
            raise ConfigError(f"{home.root} has no config.yaml: ensemble members must be meddiag run folders")
        configs.append(TrainConfig.from_file(home.config))
    for key in ("data", "seed", "val_fraction", "test_fraction", "image_size", "fit", "window", "volume_index"):
        values = [getattr(c, key) for c in configs]
        if any(v != values[0] for v in values[1:]):
            raise ConfigError(f"ensemble members were trained on different data or splits ({key}: {values}); "
                              "their validation and test images would not be the same")
    card = cards[0].model_copy(update={
        "model_name": "ensemble", "model_kwargs": {"members": [c.model_dump() for c in cards]}, "threshold": 0.5,
        "operating_point": None, "temperature": 1.0, "tta": tta, "mc_dropout": 0, "coverage": None, "abstain_threshold": None,
        "ood": None,  # the members' rules are theirs: the ensemble's own is fitted below
    })
    model = card.build_model()
    for slot, (member, _) in zip(model.members, loaded):
        slot.load_state_dict(member.state_dict())
    target = RunFolder(out)
    checkpoint = save_checkpoint(target.model_checkpoint, model, card)
    shutil.copy(homes[0].config, target.config)
    shutil.copy(homes[0].data_record, target.data_record)
    if homes[0].splits.is_dir():
        shutil.copytree(homes[0].splits, target.splits)
    write_text_atomic(target.ensemble, json.dumps({"members": [str(h.root) for h in homes],
                                                  "models": [c.model_name for c in cards]}, indent=2))
    config = configs[0].model_copy(update={"operating_point": operating_point, "calibrate": calibrate, "coverage": coverage})
    data = load_training_data(config, progress)
    settle_decision(checkpoint, data.splits["val"], config)
    settle_ood(checkpoint, data, config)
    return evaluate_run(out, data=data, progress=progress)
