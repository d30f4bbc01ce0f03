"""Workflows that span stages: train, then evaluate on the test split."""

from __future__ import annotations

from dataclasses import dataclass

from meddiag.evaluation.evaluate import evaluate_run
from meddiag.training.config import TrainConfig
from meddiag.training.run import TrainResult, train


@dataclass
class TrainEvalResult:
    train: TrainResult
    test_metrics: dict | None  # None in the extra processes of a multi-device run

    def summary(self) -> str:
        m, t = self.test_metrics or {}, self.train
        return (f"test AUC {m['auc']:.4f}  ACC {m['acc']:.4f}  in {t.train_seconds / 60:.1f} min  "
                f"-> {t.run_dir}")


def train_and_evaluate(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainEvalResult:
    """Train as ``config`` says, then evaluate the best checkpoint on the test split."""
    result = train(config, resume=resume, progress=progress)
    if not result.is_global_zero:  # one process evaluates and writes; the others are done
        return TrainEvalResult(result, None)
    metrics = evaluate_run(result.run_dir, data=result.data, split="test", progress=bool(progress))
    return TrainEvalResult(result, metrics)
