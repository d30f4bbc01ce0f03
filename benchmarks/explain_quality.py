"""Do the heatmaps mean anything, and does abstaining help? The quality bar of the explanation
issue, on trained runs (e.g. the default runs of benchmarks/foundation.py):

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/explain_quality.py RUN [RUN ...] [--images 32]

For each run (copied to ``--work``, the original untouched): the abstention threshold for 90% coverage
is chosen on the run's validation split and stored (as ``train --coverage 0.9`` does), the test split is
evaluated, and ``explain --sanity`` checks Grad-CAM on test images. Prints a markdown table: Spearman
correlation with the fully randomised model (bar: < 0.3), deletion area against random maps (bar: lower),
test error with no abstention and at the rule's coverage (bar: >= 30% lower at 90%).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import date
from pathlib import Path

from _machine import cpu_name


def check(run: Path, work: Path, images: int, method: str) -> dict:
    from meddiag.evaluation.decision import tune_decision
    from meddiag.evaluation.evaluate import best_checkpoint, evaluate_run
    from meddiag.explain.sanity import run_sanity_check
    from meddiag.models import load_checkpoint
    from meddiag.training.config import TrainConfig, read_yaml
    from meddiag.training.run import load_training_data

    copy = work / run.name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("last.ckpt", "eval-*"))
    start = time.perf_counter()
    config = TrainConfig.model_validate(read_yaml(copy / "config.yaml"))
    data = load_training_data(config, progress=False)
    tune_decision(best_checkpoint(copy), data.splits["val"], calibrate=False, operating_point=None, coverage=0.9)
    evaluate_run(copy, data=data, progress=False)
    report = json.loads((copy / "report.json").read_text())
    model, card = load_checkpoint(best_checkpoint(copy))
    sanity = run_sanity_check(copy, model, card, method, images)
    selective = report["selective_prediction"]
    rule = selective["rule"]
    return {
        "run": run.name, "data": config.data, "model": card.model_name, "method": method, "images": images,
        "spearman_random": sanity["randomisation"]["spearman_fully_random"],
        "deletion": sanity["deletion"]["deletion_auc"], "deletion_random": sanity["deletion"]["random_deletion_auc"],
        "error_all": rule["error_all"], "coverage": rule["coverage"], "error_answered": rule["error_answered"],
        "error_at_90_oracle": selective["error_at_coverage"]["90"],
        "relative_drop": 1 - rule["error_answered"] / rule["error_all"] if rule["error_all"] else float("nan"),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--method", default="gradcam")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/explain"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [check(r, args.work, args.images, args.method) for r in args.runs]
    (args.work / "explain_quality.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{date.today()}, {cpu_name()}\n")
    print("| run | Spearman vs randomised (< 0.3) | deletion area (method / random) | test error, all | "
          "coverage (rule from val) | error answered | relative drop (>= 30%) | error at exactly 90% (test-ranked) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} ({r['model']}, {r['method']}, {r['images']} images) | {r['spearman_random']:.3f} | "
              f"{r['deletion']:.3f} / {r['deletion_random']:.3f} | {r['error_all']:.3f} | {r['coverage']:.3f} | "
              f"{r['error_answered']:.3f} | {100 * r['relative_drop']:.0f}% | {r['error_at_90_oracle']:.3f} |")


if __name__ == "__main__":
    main()
