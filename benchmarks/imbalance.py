"""Class imbalance: plain training against class weights, focal loss and balanced sampling, on
BreastMNIST (546 training images: 147 malignant, 399 normal or benign) and the chest X-ray folder
(3875 pneumonia / 1341 normal). Prints a markdown table for docs/benchmarks.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/imbalance.py --data breastmnist --seeds 0 1 2
    python benchmarks/imbalance.py --data xray --seeds 0

Each run is the real command line with meddiag's defaults plus one imbalance option. Reported on the
test split: balanced accuracy at the checkpoint's threshold (0.5), AUC, and the sensitivity for the
minority class (malignant; normal) at the operating point "specificity >= 0.90" whose threshold was
chosen on the validation split (from the run's report.json), beside the test set's own best such
sensitivity (an oracle threshold, for reference only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import numpy as np

from _machine import cpu_name

XRAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray" / "chest_xray_pneumonia_kermany_224"
DATA = {"breastmnist": "breastmnist", "xray": str(XRAY)}
OPTIONS = {
    "plain": [],
    "class weights": ["--class-weights", "auto"],
    "focal loss": ["--loss", "focal"],
    "balanced sampler": ["--sampler", "balanced"],
}


def oracle_sensitivity(run: Path, positive: str) -> float:
    """The highest test sensitivity for ``positive`` with specificity >= 0.90 (threshold chosen on test)."""
    from meddiag.evaluation import stats
    from meddiag.evaluation.table import PredictionTable
    from meddiag.models import load_checkpoint

    card = load_checkpoint(run / "checkpoints" / "best.ckpt")[1]
    table = PredictionTable.read(run / "predictions.csv", card.class_names, card.task)
    i = card.class_names.index(positive)
    fpr, tpr, _ = stats.roc_curve(table.labels == i, table.probs[:, i])
    return float(tpr[(1 - fpr) >= 0.90].max())


def run_one(data: str, name: str, seed: int, runs: Path) -> dict:
    out = runs / f"{Path(data).name}-{name.replace(' ', '_')}-seed{seed}"
    cmd = ["meddiag", "train", data, *OPTIONS[name], "--seed", str(seed), "--out", str(out), "--no-progress"]
    if (out / "report.json").exists():
        print("reusing", out, flush=True)
        wall = json.loads((out / "benchmark.json").read_text())["wall_min"] * 60
    else:
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    classes = metrics["class_names"]
    train_counts = json.loads((out / "data.json").read_text())["splits"]["train"]["per_class"]
    minority = min(classes, key=lambda c: train_counts[c])
    points = report["operating_points"][classes[1]]
    if minority == classes[1]:
        sens, spec = points["spec90"]["sensitivity"], points["spec90"]["specificity"]
    else:  # the report's points are for class 1: its "sensitivity >= 0.90" is the minority's specificity >= 0.90
        sens, spec = points["sens90"]["specificity"], points["sens90"]["sensitivity"]
    row = {"config": name, "seed": seed, "minority": minority, "balanced_acc": metrics["balanced_acc"], "auc": metrics["auc"],
           "sens_at_spec90_val_threshold": sens, "spec_at_that_threshold": spec,
           "sens_at_spec90_oracle": oracle_sensitivity(out, minority), "wall_min": wall / 60}
    (out / "benchmark.json").write_text(json.dumps(row, indent=2))
    return row


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=sorted(DATA), default="breastmnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", choices=sorted(OPTIONS), help="run only these configurations")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/imbalance"))
    args = parser.parse_args()
    rows = [run_one(DATA[args.data], name, seed, args.runs) for name in (args.only or OPTIONS) for seed in args.seeds]

    print(f"\n{args.data}, seeds {' '.join(map(str, args.seeds))} — {date.today()}, {cpu_name()}\n")
    print("| training | balanced accuracy | test AUC | sensitivity at spec >= 0.90 (threshold from val) | its specificity | "
          "sensitivity at spec >= 0.90 (test oracle) | minutes per run |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or OPTIONS:
        mine = [r for r in rows if r["config"] == name]
        cols = [fmt([r[k] for r in mine]) for k in ("balanced_acc", "auc", "sens_at_spec90_val_threshold",
                                                    "spec_at_that_threshold", "sens_at_spec90_oracle")]
        print(f"| {name} | " + " | ".join(cols) + f" | {np.mean([r['wall_min'] for r in mine]):.1f} |")


if __name__ == "__main__":
    main()
