"""Image + patient data on HAM10000: image-only vs fused (late, FiLM) vs covariates-only (network and
boosted trees), on the same seeded stratified 70/10/20 split by lesion, for several seeds. Prints
markdown tables for docs/benchmarks.md.

    python benchmarks/fusion.py --seeds 0 1 2                      # seed_cnn at 28 px, 30 epochs
    python benchmarks/fusion.py --model resnet18 --image-size 28 --epochs 30 --seeds 0
    python benchmarks/fusion.py --wide-only                        # the wide-table timing alone

Covariates: age, sex, localization (HAM10000 metadata; 36 images lack age and sex). ``dx_type`` is
never a covariate (how the label was confirmed: a leak). Reported on the test split: macro AUC,
balanced accuracy (argmax), melanoma sensitivity at the threshold giving specificity >= 0.90 on the
validation split; the fused minus image-only AUC with its paired bootstrap 95% CI (lesions
resampled); the fused model's AUC with 0/25/50/100% of the test covariates withheld, and with all
withheld against the image-only model.

The wide-table check generates 1,000 numeric columns keyed by lesion (signal in 7 of them: +1.5 SD in
the column of the lesion's class; 30% of lesions absent from the table) and times reading + joining it
and one tabular-model training (boosted trees on the same table for reference).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from _machine import cpu_name

HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dermatology" / "ham10000_subset"
COVARIATES = ["age", "sex", "localization"]


def write_manifest(out: Path) -> Path:
    """HAM10000's metadata as a meddiag manifest (path, label, patient_id = lesion, covariates)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "ham10000.csv"
    rows = list(csv.DictReader(open(HAM / "metadata.csv", newline="")))
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "patient_id", "age", "sex", "localization", "dx_type"])
        for r in rows:
            w.writerow([HAM / "images" / f"{r['image_id']}.jpg", r["dx"], r["lesion_id"], r["age"], r["sex"],
                        r["localization"], r["dx_type"]])
    return manifest


def melanoma_sensitivity(val_y: np.ndarray, val_p: np.ndarray, y: np.ndarray, p: np.ndarray, mel: int) -> float:
    from meddiag.evaluation import stats

    threshold = stats.choose_threshold(val_y == mel, val_p[:, mel], "spec90")
    return float(((p[:, mel] >= threshold) & (y == mel)).sum() / max(1, (y == mel).sum()))


def one_seed(manifest: Path, seed: int, args: argparse.Namespace, out: Path) -> dict:
    from meddiag.data.covariates import TabularSpec, parse_columns
    from meddiag.data.sources import load_data
    from meddiag.evaluation.evaluate import split_probabilities
    from meddiag.evaluation.fusion import FRACTIONS, boosted_trees_probabilities, paired_difference
    from meddiag.evaluation.metrics import balanced_accuracy, macro_auc
    from meddiag.models.checkpoint import load_checkpoint
    from meddiag.models.fusion import covariate_tensor, withhold
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    data = load_data(str(manifest), image_size=args.image_size, seed=seed, val_fraction=0.1, test_fraction=0.2, progress=False,
                     covariates=TabularSpec(columns=parse_columns(COVARIATES)))
    test, val = data.splits["test"], data.splits["val"]
    y, vy = test.labels.numpy(), val.labels.numpy()
    mel = data.class_names.index("mel")
    variants = {"image only": {}, "fused (late)": {"covariates": COVARIATES, "fusion": "late"},
                "fused (FiLM)": {"covariates": COVARIATES, "fusion": "film"},
                "covariates only (network)": {"covariates": COVARIATES, "model": "tabular"}}
    results: dict[str, dict] = {}
    probs: dict[str, np.ndarray] = {}
    for name, extra in variants.items():
        run = out / f"seed{seed}-{name.split(' (')[-1].rstrip(')').replace(' ', '_')}"
        config = TrainConfig(data=str(manifest), model=extra.get("model", args.model), image_size=args.image_size,
                             epochs=args.epochs, seed=seed, out=str(run), augment={"hflip": True},
                             **{k: v for k, v in extra.items() if k != "model"})
        if not (run / "training.json").exists():
            start = time.perf_counter()
            train(config, progress=False, data=data)
            seconds = time.perf_counter() - start
        else:
            seconds = json.loads((run / "training.json").read_text())["train_seconds"]
        model, card = load_checkpoint(run / "checkpoints" / "best.ckpt")
        enc = covariate_tensor(card.covariates, test.covariates)
        p = split_probabilities(model, card, test, enc)
        pv = split_probabilities(model, card, val, covariate_tensor(card.covariates, val.covariates))
        probs[name] = p
        row = {"auc": macro_auc(y, p, "multiclass"), "balanced_acc": balanced_accuracy(y, p, "multiclass", 0.5),
               "mel_sens_spec90": melanoma_sensitivity(vy, pv, y, p, mel), "train_min": seconds / 60}
        if card.covariates is not None and card.model_name != "tabular":
            missing_row = torch.from_numpy(card.covariates.missing_row())
            blocks = [torch.tensor(ix) for ix in card.covariates.block_features().values()]
            rng = np.random.default_rng(seed)
            curve = []
            for fraction in FRACTIONS:
                drop = torch.from_numpy(rng.random((len(y), len(blocks))) < fraction)
                curve.append(macro_auc(y, split_probabilities(model, card, test, withhold(enc, missing_row, blocks, drop)), "multiclass"))
            row["robustness"] = curve
            probs[name + " withheld"] = split_probabilities(model, card, test, None)
        results[name] = row
        print(f"seed {seed} {name}: {row}", flush=True)
    p = boosted_trees_probabilities(data.splits["train"], test, data.num_classes, seed)
    pv = boosted_trees_probabilities(data.splits["train"], val, data.num_classes, seed)
    results["covariates only (boosted trees)"] = {"auc": macro_auc(y, p, "multiclass"),
                                                 "balanced_acc": balanced_accuracy(y, p, "multiclass", 0.5),
                                                 "mel_sens_spec90": melanoma_sensitivity(vy, pv, y, p, mel), "train_min": 0.0}
    for name in ("fused (late)", "fused (FiLM)"):
        results[name]["vs_image"] = paired_difference(y, probs[name], probs["image only"], "multiclass", 0.5, test.groups, 1000, seed)["auc"]
        results[name]["withheld_vs_image"] = macro_auc(y, probs[name + " withheld"], "multiclass") - results["image only"]["auc"]
    return results


def wide_table(manifest: Path, out: Path, args: argparse.Namespace) -> dict:
    """A generated 1,000-column table joined by lesion: reading + joining time, and a tabular-model run."""
    from meddiag.data.covariates import TabularSpec
    from meddiag.data.sources import load_data
    from meddiag.evaluation.evaluate import split_probabilities
    from meddiag.evaluation.fusion import boosted_trees_probabilities
    from meddiag.evaluation.metrics import macro_auc
    from meddiag.models.checkpoint import load_checkpoint
    from meddiag.models.fusion import covariate_tensor
    from meddiag.training.config import TrainConfig
    from meddiag.training.run import train

    rows = list(csv.DictReader(open(manifest, newline="")))
    rng = np.random.default_rng(0)
    classes = sorted({r["label"] for r in rows})
    table = out / "genomics.csv"
    n_cols, signal = 1000, len(classes)  # one signal column per class: +1.5 SD for that class's lesions
    kept = [r for r in rows if rng.random() >= 0.30]
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", *[f"gene_{j:04d}" for j in range(n_cols)]])
        for r in kept:
            values = rng.normal(size=n_cols)
            values[:signal] += 1.5 * (np.arange(signal) == classes.index(r["label"]))
            w.writerow([r["patient_id"], *[f"{v:.4f}" for v in values]])
    spec = TabularSpec(tabular=table, join="patient_id", tabular_columns=["gene_*"])
    start = time.perf_counter()
    data = load_data(str(manifest), image_size=args.image_size, seed=0, progress=False, covariates=spec)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    load_data(str(manifest), image_size=args.image_size, seed=0, progress=False)
    images_s = time.perf_counter() - start
    run = out / "wide-tabular"
    config = TrainConfig(data=str(manifest), model="tabular", tabular=str(table), tabular_columns=["gene_*"], epochs=30,
                         image_size=args.image_size, out=str(run))
    start = time.perf_counter()
    if not (run / "training.json").exists():
        train(config, progress=False, data=data)
    train_s = time.perf_counter() - start
    model, card = load_checkpoint(run / "checkpoints" / "best.ckpt")
    test = data.splits["test"]
    p = split_probabilities(model, card, test, covariate_tensor(card.covariates, test.covariates))
    trees = boosted_trees_probabilities(data.splits["train"], test, data.num_classes, 0)
    return {"trees_test_auc": macro_auc(test.labels.numpy(), trees, "multiclass"),"rows": len(kept), "columns": n_cols, "absent_share": 1 - len(kept) / len(rows), "file_mb": table.stat().st_size / 2**20,
            "load_join_s": load_s, "images_only_load_s": images_s, "tabular_train_s": train_s, "features": card.covariates.n_features,
            "test_auc": macro_auc(test.labels.numpy(), p, "multiclass")}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/fusion"))
    parser.add_argument("--wide-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = args.out / f"{args.model}-{args.image_size}"
    manifest = write_manifest(args.out)
    print(f"date {date.today()}, {cpu_name()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    wide = wide_table(manifest, args.out, args)
    print(f"wide table: {wide}", flush=True)
    if args.wide_only:
        print(f"\nwide table: {wide['rows']} rows x {wide['columns']} numeric columns ({wide['file_mb']:.0f} MB, "
              f"{100 * wide['absent_share']:.0f}% of lesions absent): load + join {wide['load_join_s']:.1f} s "
              f"(images alone {wide['images_only_load_s']:.1f} s); tabular model, 30 epochs: {wide['tabular_train_s']:.1f} s, "
              f"test macro AUC {wide['test_auc']:.4f} (boosted trees {wide['trees_test_auc']:.4f})")
        return
    per_seed = [one_seed(manifest, s, args, out) for s in args.seeds]
    (out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": per_seed,
                                                  "wide": wide}, indent=2, default=float))
    names = list(per_seed[0])
    print(f"\n{args.model} at {args.image_size} px, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))} "
          "(mean ± SD over seeds)\n")
    print("| model | macro AUC | balanced accuracy | melanoma sensitivity at val spec 0.90 | train min |")
    print("|---|---|---|---|---|")
    for name in names:
        rows = [r[name] for r in per_seed]
        print(f"| {name} | {mean_sd([r['auc'] for r in rows])} | {mean_sd([r['balanced_acc'] for r in rows])} | "
              f"{mean_sd([r['mel_sens_spec90'] for r in rows])} | {statistics.fmean(r['train_min'] for r in rows):.1f} |")
    print("\n| fused | seed | AUC minus image-only (paired 95% CI) | CI excludes 0 | all covariates withheld minus image-only | "
          "AUC at 0 / 25 / 50 / 100% withheld |")
    print("|---|---|---|---|---|---|")
    for name in ("fused (late)", "fused (FiLM)"):
        for seed, r in zip(args.seeds, per_seed):
            d = r[name]["vs_image"]
            print(f"| {name} | {seed} | {d['difference']:+.4f} ({d['ci'][0]:+.4f} to {d['ci'][1]:+.4f}) | "
                  f"{'yes' if d['excludes_zero'] else 'no'} | {r[name]['withheld_vs_image']:+.4f} | "
                  f"{' / '.join(f'{a:.4f}' for a in r[name]['robustness'])} |")
    print(f"\nwide table: {wide['rows']} rows x {wide['columns']} numeric columns ({wide['file_mb']:.0f} MB, "
          f"{100 * wide['absent_share']:.0f}% of lesions absent): load + join {wide['load_join_s']:.1f} s "
          f"(images alone {wide['images_only_load_s']:.1f} s); {wide['features']} encoded features; tabular model, 30 epochs: "
          f"{wide['tabular_train_s']:.1f} s, test macro AUC {wide['test_auc']:.4f} (boosted trees {wide['trees_test_auc']:.4f})")


if __name__ == "__main__":
    main()
