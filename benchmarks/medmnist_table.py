"""meddiag's default recipe on every MedMNIST file held (2D and 3D) and on the chest X-ray folder,
3 seeds each, beside the published baselines. Prints markdown tables for docs/benchmarks.md
and writes them to RUNS/table.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/medmnist_table.py [--seeds 0 1 2] [--only pneumoniamnist ...]

Each run is the real command line, `meddiag train NAME --seed S` with nothing else, in its own
folder under --runs; a folder that already holds a finished run is reused (so the table can be
built over several sessions). Reported: test AUC and ACC (mean ± std over seeds), the wall time of
the command (mean), and training images per second (images x epochs / the epochs' own time,
validation included).

Baselines: Yang et al., MedMNIST v2, Scientific Data 10:41 (2023), Table 2 (2D) and Table 3 (3D),
test split, AUC / ACC. The chest X-ray folder is compared with Kermany et al., Cell 2018 (as commonly
quoted: ACC 92.8%, sensitivity 93.2%, specificity 90.1%, AUC 0.968).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

from _machine import cpu_name

XRAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray" / "chest_xray_pneumonia_kermany_224"

# (AUC, ACC) on the test split; None where the paper has no such entry.
BASELINES = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864), "ResNet-50 (28)": (0.948, 0.854),
                       "ResNet-50 (224)": (0.962, 0.884), "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
                       "Google AutoML Vision": (0.991, 0.946)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-18 (224)": (0.891, 0.833), "ResNet-50 (28)": (0.857, 0.812),
                    "ResNet-50 (224)": (0.866, 0.842), "auto-sklearn": (0.836, 0.803), "AutoKeras": (0.871, 0.831),
                    "Google AutoML Vision": (0.919, 0.861)},
    "adrenalmnist3d": {"ResNet-18+3D": (0.827, 0.721), "ResNet-50+3D": (0.828, 0.745), "auto-sklearn": (0.828, 0.802),
                       "AutoKeras": (0.804, 0.705)},
}
RESNETS = ("ResNet-18", "ResNet-50")
KERMANY = {"acc": 0.928, "sensitivity": 0.932, "specificity": 0.901, "auc": 0.968}


def held_datasets(root: Path) -> list[str]:
    """meddiag names of the MedMNIST files under ``root``: pneumoniamnist, adrenalmnist3d@64, ..."""
    names = []
    for f in sorted(root.glob("*.npz")):
        stem = f.stem
        if "_" in stem and stem.rsplit("_", 1)[1].isdigit():
            base, size = stem.rsplit("_", 1)
            names.append(f"{base}@{size}")
        else:
            names.append(stem)
    return names


RESOLVED = {"image_size", "batch_size", "out"}  # filled in by training from the data


def recipe_changes(run_config: Path, data: str, seed: int) -> list[str]:
    """Settings in which a finished run's config.yaml differs from today's defaults (so it cannot stand
    for today's recipe). Keys missing from the file count as changed: the setting did not exist then."""
    import yaml

    from meddiag.training.config import TrainConfig

    then = yaml.safe_load(run_config.read_text())
    now = TrainConfig(data=data, seed=seed).model_dump(mode="json")
    return sorted(k for k in now.keys() - RESOLVED if then.get(k, "<absent>") != now[k])


def run_one(name: str, data: str, seed: int, runs: Path) -> dict:
    out = runs / f"{name.replace('@', '_')}-seed{seed}"
    record = out / "benchmark.json"
    if (out / "metrics.json").exists() and (changed := recipe_changes(out / "config.yaml", data, seed)):
        raise SystemExit(f"{out} was trained with another recipe (differs in: {', '.join(changed)}); "
                         "move it aside to train it again with today's defaults")
    if not (out / "metrics.json").exists():
        if out.exists():  # an interrupted run: start it again
            shutil.rmtree(out)
        cmd = ["meddiag", "train", data, "--seed", str(seed), "--out", str(out), "--no-progress"]
        print("$", " ".join(cmd), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        record.write_text(json.dumps({"wall_min": (time.perf_counter() - start) / 60, "date": str(date.today())}))
    metrics = json.loads((out / "metrics.json").read_text())
    history = list(csv.DictReader(open(out / "history.csv")))
    n_train = json.loads((out / "data.json").read_text())["splits"]["train"]["n_images"]
    epoch_seconds = sum(float(r["time_s"]) for r in history)
    row = {"name": name, "seed": seed, "auc": metrics["auc"], "acc": metrics["acc"], "epochs": len(history),
           "img_s": n_train * len(history) / epoch_seconds,
           "wall_min": json.loads(record.read_text())["wall_min"] if record.exists() else None}
    if metrics["task"] == "binary":
        positive = metrics["class_names"][1]
        row["sensitivity"] = metrics["per_class"][positive]["sensitivity"]
        row["specificity"] = metrics["per_class"][positive]["specificity"]
        # the report's validation-chosen "sensitivity >= 0.90" operating point, applied to the test split
        point = json.loads((out / "report.json").read_text())["operating_points"][positive].get("sens90")
        if point:
            row["sens90"] = {"acc": (point["tp"] + point["tn"]) / (point["tp"] + point["tn"] + point["fp"] + point["fn"]),
                             "sensitivity": point["sensitivity"], "specificity": point["specificity"],
                             "threshold": point["threshold"]}
    return row


def fmt(values: list[float]) -> str:
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="data sets to train (names as printed; 'xray' for the folder); "
                        "the table also lists those already finished")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/medmnist"))
    args = parser.parse_args()
    root = Path(os.environ.get("MEDDIAG_DATA", Path.home() / ".meddiag" / "data"))
    names = held_datasets(root) + (["xray"] if XRAY.is_dir() else [])
    unknown = set(args.only or ()) - set(names)
    if unknown:
        raise SystemExit(f"not held here: {', '.join(sorted(unknown))} (held: {', '.join(names)})")

    def finished(name: str) -> bool:
        return all((args.runs / f"{name.replace('@', '_')}-seed{s}" / "metrics.json").exists() for s in args.seeds)

    # --only picks what to train; the table also shows every other data set already finished for all seeds
    names = [n for n in names if not args.only or n in args.only or finished(n)]
    results = {n: [run_one(n, str(XRAY) if n == "xray" else n, s, args.runs) for s in args.seeds] for n in names}

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    emit(f"\n{date.today()}, {cpu_name()}, {os.cpu_count()} cores; "
          f"`meddiag train NAME --seed S`, seeds {' '.join(map(str, args.seeds))}\n")
    emit("| data | test AUC | test ACC | best ResNet baseline AUC / ACC | beats it? | epochs | wall min | train img/s |")
    emit("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        if name == "xray":
            continue
        auc, acc = [r["auc"] for r in rows], [r["acc"] for r in rows]
        base = BASELINES.get(name.split("@")[0], {})
        resnets = [v for k, v in base.items() if k.startswith(RESNETS)]
        best_auc, best_acc = (max(v[0] for v in resnets), max(v[1] for v in resnets)) if resnets else (None, None)
        verdict = "" if best_auc is None else (
            f"AUC {statistics.fmean(auc) - best_auc:+.3f}, ACC {statistics.fmean(acc) - best_acc:+.3f}"
            + (" — yes" if statistics.fmean(auc) > best_auc and statistics.fmean(acc) > best_acc else " — **no**"))
        walls = [r["wall_min"] for r in rows if r["wall_min"] is not None]
        emit(f"| {name} | {fmt(auc)} | {fmt(acc)} | " + (f"{best_auc:.3f} / {best_acc:.3f}" if best_auc else "–")
              + f" | {verdict} | {statistics.fmean(r['epochs'] for r in rows):.0f} | "
              + (f"{statistics.fmean(walls):.1f}" if walls else "–") + f" | {statistics.fmean(r['img_s'] for r in rows):.0f} |")
    # one line per published data set: adrenalmnist3d and adrenalmnist3d@64 share theirs
    for base_name in dict.fromkeys(n.split("@")[0] for n in results if n != "xray"):
        emit(f"\nPublished on {base_name} (AUC / ACC): "
              + "; ".join(f"{k} {a:.3f} / {c:.3f}" for k, (a, c) in BASELINES.get(base_name, {}).items()))
    if "xray" in results:
        rows = results["xray"]
        emit("\n| chest X-ray folder | ACC | sensitivity | specificity | AUC |")
        emit("|---|---|---|---|---|")
        emit(f"| meddiag defaults (ResNet-18, 128 px), threshold 0.5 | {fmt([r['acc'] for r in rows])} | "
              f"{fmt([r['sensitivity'] for r in rows])} | {fmt([r['specificity'] for r in rows])} | {fmt([r['auc'] for r in rows])} |")
        if all("sens90" in r for r in rows):
            points = [r["sens90"] for r in rows]
            thresholds = ", ".join(f"{p['threshold']:.3f}" for p in points)
            emit(f"| the same models at the report's sensitivity >= 0.90 point, chosen on validation (thresholds "
                  f"{thresholds}) | {fmt([p['acc'] for p in points])} | "
                  f"{fmt([p['sensitivity'] for p in points])} | {fmt([p['specificity'] for p in points])} | "
                  f"{fmt([r['auc'] for r in rows])} |")
        emit(f"| Kermany et al. 2018 | {KERMANY['acc']:.3f} | {KERMANY['sensitivity']:.3f} | {KERMANY['specificity']:.3f} | {KERMANY['auc']:.3f} |")

    table = args.runs / "table.md"
    table.write_text("\n".join(lines) + "\n")
    print(f"\n(written to {table})")


if __name__ == "__main__":
    main()
