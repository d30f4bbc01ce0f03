"""Transfer learning (issue #18): label efficiency with self-supervised pretraining on the chest X-ray
folder, cross-task transfer from a chest X-ray model to PneumoniaMNIST, and the cost of pretraining.
Prints markdown tables for docs/benchmarks.md.

    python benchmarks/transfer.py pretrain                 # meddiag pretrain on the X-ray training images
    python benchmarks/transfer.py labels --seeds 0 1 2     # 1/10/100% of the labels: scratch vs pretrained
    python benchmarks/transfer.py cross --seeds 0 1 2      # X-ray model -> PneumoniaMNIST@64, all / 200 images
    python benchmarks/transfer.py features --fractions 0.01 1 --seeds 0 1 2
                                                           # logistic regression on the pretraining's frozen features
    python benchmarks/transfer.py labels --pretrain-config benchmarks/configs/mild-views.yaml --arms pretrained-probe
                                                           # another pretraining (its runs in folders of their own;
                                                           # mild-views: meddiag pretrain's views before 2026-12-07)
    python benchmarks/transfer.py labels --pretrain-config benchmarks/configs/strong-views.yaml --pretrain-more 50 ...
                                                           # 50 epochs more from that pretraining, then the runs

Every run is the real command line (``meddiag pretrain`` / ``meddiag train``) with meddiag's defaults plus
the option under test; a finished run folder is reused, so the tables can fill in over several sittings. Each
run's stamp records its wall time, processor and date, and a table made on more than one says which run ran
where. A pretraining folder made with other views than the call asks for is refused, not reused.

Label efficiency. The X-ray folder's ``train/`` (1341 normal, 3875 pneumonia) is split once (seed 0) into a
fixed stratified 10% validation set and a pool; a run with fraction p trains on a stratified p of the pool
(drawn anew for each seed) and is tested on the folder's ``test/`` (234 / 390). The validation images only
choose the operating point (the default recipe keeps the final weights, so they select nothing else),
identical in every arm. Pretraining (``meddiag pretrain``, SimCLR) sees every image of ``train/`` with its
label removed, never ``test/``; one pretraining serves the three seeds. Reported on test: AUC, accuracy at
threshold 0.5, and accuracy at the validation-chosen Youden point.

Cross-task. The source is one scratch model trained on 100% of the X-ray labels (``--source-seed``, the same
run as the label-efficiency table's); each seed then trains the targets from it and from scratch. The targets are
PneumoniaMNIST at 64 px (its 28 px images enlarged: no 64 px file is held here) with all 4708 training images,
and with a stratified 200 of them (PNG files written from the .npz; the full validation and test splits).
At 64 px ResNet-18 has meddiag's small-image stem (stride 1, no max-pool) where the 128 px source had the
strided one, so ``--subset-sizes 64 128`` also runs the subset at the source's own size. PneumoniaMNIST is
made from the same Kermany et al. collection: its training images are among those the source learned from
(at another size), and its test split has the counts of the folder's ``test/`` (234 normal, 390 pneumonia),
the collection's test images, which no run trains on.

    python benchmarks/transfer.py cross --seeds 0 --no-subset-target --full-epochs 5   # the whole split, shortened
    python benchmarks/transfer.py cross --seeds 0 1 2 --no-full-target --subset-sizes 64 128
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
from _machine import cpu_name

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
XRAY = SHARED / "xray" / "chest_xray_pneumonia_kermany_224"
FRACTIONS = (0.01, 0.1, 1.0)


REPORT_ONLY = False  # --report-only: tabulate the finished runs, start none


class NotRun(Exception):
    """A run that is not finished, skipped under --report-only."""


def run(cmd: list[str], out: Path, done: str = "report.json") -> dict:
    """Run ``cmd`` unless ``out/done`` exists; its stamp (stored beside the run): the wall time in minutes and
    the processor and date it ran on, so a table filled in over sittings on different machines can say which."""
    stamp = out / "benchmark_wall.json"
    if (out / done).exists() and stamp.exists():
        print("reusing", out, flush=True)
        return {"cpu": "not recorded", "date": "not recorded", **json.loads(stamp.read_text())}
    if REPORT_ONLY:
        raise NotRun(out)
    print("$", " ".join(map(str, cmd)), flush=True)
    start = time.perf_counter()
    resume = ["--resume"] if (out / "checkpoints" / "last.ckpt").exists() else []
    subprocess.run([*map(str, cmd), *resume], check=True)
    made = {"wall_min": (time.perf_counter() - start) / 60, "cpu": cpu_name(), "date": str(date.today())}
    stamp.write_text(json.dumps(made))
    return made


def test_figures(out: Path) -> dict:
    """Test AUC, accuracy at 0.5 and at the validation-chosen Youden point of a finished run."""
    metrics = json.loads((out / "metrics.json").read_text())
    report = json.loads((out / "report.json").read_text())
    points = next(iter(report["operating_points"].values()))
    youden = points["youden"]
    acc = (youden["tp"] + youden["tn"]) / (youden["tp"] + youden["tn"] + youden["fp"] + youden["fn"])
    return {"auc": metrics["auc"], "acc": metrics["acc"], "acc_youden": acc, "threshold_youden": youden["threshold"]}


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


# -- pretraining ------------------------------------------------------------------------------------------

def pretrain_tag(args: argparse.Namespace) -> str:
    """'' for meddiag's pretraining defaults, '-<stem>' for a --pretrain-config, '-plusN' for N more epochs
    (--pretrain-more): each pretraining's runs get folders of their own."""
    return (f"-{args.pretrain_config.stem}" if args.pretrain_config else "") + (f"-plus{args.pretrain_more}" if args.pretrain_more else "")


def check_views(out: Path, config: Path | None) -> None:
    """Stop before reusing (or resuming) a pretraining folder made with other views than this call asks for:
    reuse goes by folder name, and meddiag pretrain's default views have changed (mild-views.yaml: the old ones)."""
    from meddiag.training.config import read_yaml
    from meddiag.training.pretrain import PretrainConfig

    if not (out / "config.yaml").exists():
        return
    made = read_yaml(out / "config.yaml")
    wanted = PretrainConfig.from_sources(config, data=str(XRAY))
    if made.get("augment") != wanted.augment.model_dump() or made.get("noise") != wanted.noise:
        raise SystemExit(f"{out} was made with other views (augment {made.get('augment')}, noise {made.get('noise')}) "
                         f"than this call's ({wanted.augment.model_dump()}, noise {wanted.noise}): move it aside, or "
                         "pass the --pretrain-config it was made with (benchmarks/configs/mild-views.yaml: the defaults "
                         "before 2026-12-07)")


def pretrain_folder(args: argparse.Namespace) -> Path:
    """The pretraining the label runs start from (made unless it has finished): ``--pretrain-epochs`` epochs with
    ``--pretrain-config``'s views, and with ``--pretrain-more N`` a second pretraining that starts from it
    (``meddiag pretrain --init-weights``) for N epochs more."""
    views = f"-{args.pretrain_config.stem}" if args.pretrain_config else ""
    base = args.runs / f"pretrain-xray-{args.model}-e{args.pretrain_epochs}{views}"
    config = ["--config", args.pretrain_config] if args.pretrain_config else []
    steps = [(base, ["--epochs", args.pretrain_epochs])]
    if args.pretrain_more:
        steps.append((args.runs / f"pretrain-xray-{args.model}-e{args.pretrain_epochs}-plus{args.pretrain_more}{views}",
                      ["--epochs", args.pretrain_more, "--init-weights", base]))
    for out, extra in steps:
        check_views(out, args.pretrain_config)
        made = run(["meddiag", "pretrain", XRAY, "--model", args.model, *extra, "--out", out, "--no-progress", *config],
                   out, done="pretrain.json")
        info = json.loads((out / "pretrain.json").read_text())
        history = (out / "history.csv").read_text().splitlines()
        before = f" after {info['epochs_before']}" if info.get("epochs_before") else ""
        print(f"\npretraining {out.name}: {info['images']} images, {info['epochs']} epochs{before}, {info['seconds_per_epoch']} s "
              f"per epoch, {made['wall_min']:.1f} min in all ({made['cpu']}, {made['date']}); last epoch: {history[-1]}")
    return steps[-1][0]


# -- label efficiency -------------------------------------------------------------------------------------

def xray_files() -> tuple[list[tuple[Path, str, str]], list[tuple[Path, str, str]]]:
    """(train, test) as (path, label, split) of the folder, in a fixed order."""
    def files(split: str) -> list[tuple[Path, str, str]]:
        return [(p, label, split) for label in ("NORMAL", "PNEUMONIA")
                for p in sorted((XRAY / split / label).iterdir()) if p.is_file()]
    return files("train"), files("test")


def label_manifest(fraction: float, seed: int, root: Path) -> Path:
    """A manifest: a stratified ``fraction`` of the pool (seed), the fixed validation set, the test folder."""
    from meddiag.data.splits import stratified_split

    train, test = xray_files()
    labels = np.array([0 if lab == "NORMAL" else 1 for _, lab, _ in train])
    pool, val = stratified_split(labels, 0.1, seed=0)
    if fraction < 1.0:
        _, chosen = stratified_split(labels[pool], fraction, seed=seed)
        pool = pool[chosen]
    rows = [(train[i][0], train[i][1], "train") for i in sorted(pool)] + \
           [(train[i][0], train[i][1], "val") for i in sorted(val)] + test
    path = root / f"xray-labels{fraction:g}-seed{seed}.csv"
    root.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows((str(p), lab, split) for p, lab, split in rows)
    return path


LR1 = "pretrained, --backbone-lr-mult 1"
PROBE = "pretrained, --freeze-backbone (linear probe)"
LPFT = "pretrained, --freeze-epochs 10 (probe, then fine-tune)"
ARM_FOLDERS = {"scratch": "scratch", "pretrained": "pretrained", LR1: "pretrained-lr1", PROBE: "pretrained-probe",
               LPFT: "pretrained-lpft"}
OPTIONAL_ARMS = (LR1, PROBE, LPFT)  # run only for --extra-fractions


def arms(weights: Path) -> dict[str, list]:
    """The starts compared: from scratch; from the pretraining with the fine-tuning defaults (the backbone at a
    tenth of the learning rate, a warm-up epoch); with the backbone at the full learning rate; the backbone
    frozen (only the new head learns: a linear probe of the pretrained features); and the probe for the first
    half of the epochs, then the defaults (LP-FT: the head is already fitted when the backbone starts to move,
    so its first gradients do not scramble the pretrained features)."""
    return {"scratch": [], "pretrained": ["--init-weights", weights],
            LR1: ["--init-weights", weights, "--backbone-lr-mult", "1"],
            PROBE: ["--init-weights", weights, "--freeze-backbone"],
            LPFT: ["--init-weights", weights, "--freeze-epochs", "10"]}


def labels(args: argparse.Namespace) -> None:
    # pretrain only when an arm starts from the pretraining (a scratch-only call needs none)
    weights = pretrain_folder(args) if set(args.arms) - {"scratch"} else None
    rows = []
    for fraction in args.fractions:
        for seed in args.seeds:
            manifest = label_manifest(fraction, seed, args.runs / "manifests")
            n_train = sum(1 for r in csv.DictReader(open(manifest)) if r["split"] == "train")
            for arm, extra in arms(weights).items():
                if ARM_FOLDERS[arm] not in args.arms or (arm in OPTIONAL_ARMS and fraction not in args.extra_fractions):
                    continue
                tag = "" if arm == "scratch" else pretrain_tag(args)
                out = args.runs / "labels" / f"{ARM_FOLDERS[arm]}{tag}-{fraction:g}-seed{seed}"
                cmd = ["meddiag", "train", manifest, "--model", args.model, "--seed", seed, "--out", out, "--no-progress", *extra]
                try:
                    made = run(cmd, out)
                except NotRun:
                    continue
                rows.append({"arm": arm, "fraction": fraction, "seed": seed, "n_train": n_train, **made,
                             **test_figures(out)})
    (args.runs / "labels.json").write_text(json.dumps(rows, indent=2))
    header(args)
    print("| labels used for training | images | start | test AUC | ACC at 0.5 | ACC at the val-chosen Youden point | minutes per run |")
    print("|---|---|---|---|---|---|---|")
    for fraction in args.fractions:
        for arm in ARM_FOLDERS:
            mine = [r for r in rows if r["arm"] == arm and r["fraction"] == fraction]
            if mine:
                print(f"| {fraction:.0%} | {round(statistics.fmean(r['n_train'] for r in mine))} | {arm} | "
                      + " | ".join(fmt([r[k] for r in mine]) for k in ("auc", "acc", "acc_youden"))
                      + f" | {statistics.fmean(r['wall_min'] for r in mine):.1f} |")
    print("\nPer seed (test AUC):")
    for fraction in args.fractions:
        for arm in ARM_FOLDERS:
            mine = [r for r in rows if r["arm"] == arm and r["fraction"] == fraction]
            if mine:
                print(f"- {fraction:.0%} {arm}: " + ", ".join(f"{r['auc']:.4f}" for r in mine))
    machines(rows, lambda r: f"{r['fraction']:.0%} {ARM_FOLDERS[r['arm']]} seed {r['seed']}")
    full = [r["auc"] for r in rows if r["arm"] == "scratch" and r["fraction"] == 1.0]
    one_s = [r["auc"] for r in rows if r["arm"] == "scratch" and r["fraction"] == 0.01]
    for arm in ARM_FOLDERS:
        if arm == "scratch":
            continue
        ten = [r["auc"] for r in rows if r["arm"] == arm and r["fraction"] == 0.1]
        one_p = [r["auc"] for r in rows if r["arm"] == arm and r["fraction"] == 0.01]
        if full and ten:
            print(f"\n{arm}: at 10% minus scratch at 100%: {statistics.fmean(ten) - statistics.fmean(full):+.4f} AUC "
                  f"(target >= -0.01; {len(ten)} against {len(full)} seeds)")
        if one_p and one_s:
            print(f"{arm}: at 1% minus scratch at 1%: {statistics.fmean(one_p) - statistics.fmean(one_s):+.4f} AUC "
                  f"(target >= +0.05; {len(one_p)} against {len(one_s)} seeds)")
        paired(rows, arm, 0.01)


def paired(rows: list[dict], arm: str, fraction: float) -> None:
    """The arm minus scratch seed by seed (the same labelled images): mean, standard error and wins. Seeds differ
    far more in which images they draw than arms do, so the paired difference is the sharper comparison."""
    mine = {r["seed"]: r["auc"] for r in rows if r["arm"] == arm and r["fraction"] == fraction}
    base = {r["seed"]: r["auc"] for r in rows if r["arm"] == "scratch" and r["fraction"] == fraction}
    both = sorted(set(mine) & set(base))
    if len(both) < 2:
        return
    diffs = [mine[s] - base[s] for s in both]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    print(f"{arm}: at {fraction:.0%}, paired by seed: {statistics.fmean(diffs):+.4f} ± {se:.4f} (s.e.) AUC over scratch, "
          f"better in {sum(d > 0 for d in diffs)} of {len(diffs)} seeds")


def features(args: argparse.Namespace) -> None:
    """How far a pretraining's features go without fine-tuning: an L2-regularised logistic regression (its
    strength chosen by 5-fold cross-validated AUC on the training images alone, features standardised) on the
    frozen encoder's features of each label set, tested on ``test/``. The linear-evaluation protocol of the
    self-supervised literature, with a closed-form fit in place of the SGD probe's 20 epochs; at 100% of the
    labels it says what the features hold for a linear head at most."""
    import torch
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from meddiag.data.sources import load_data
    from meddiag.data.transforms import normalize, to_unit_float
    from meddiag.training.pretrain import encoder_of

    global REPORT_ONLY
    REPORT_ONLY, was = True, REPORT_ONLY  # a finished pretraining only: this part starts none
    try:
        folder = pretrain_folder(args)
    except NotRun:
        raise SystemExit("features: the pretraining has not finished; run `labels` or `pretrain` with the same options first") from None
    finally:
        REPORT_ONLY = was
    saved = torch.load(folder / "weights.pt", weights_only=True)
    meta = saved["meddiag_pretrain"]
    encoder, _ = encoder_of(args.model, meta["in_channels"], meta["spatial_dims"], meta["image_size"], meta.get("model_kwargs", {}))
    encoder.load_state_dict(saved["state_dict"])
    encoder.eval()

    def embed(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([encoder(normalize(to_unit_float(images[i:i + 128]), 0.5, 0.5)).flatten(1).numpy()
                                   for i in range(0, len(images), 128)])

    header(args)
    print(f"Features of {folder.name} ({meta['epochs'] + meta.get('epochs_before', 0)} epochs), frozen; "
          "logistic regression, C by 5-fold cross-validated AUC on the training images:\n")
    print("| labels | images | test AUC | per seed |")
    print("|---|---|---|---|")
    test_features = None
    for fraction in args.fractions:
        aucs, n = [], 0
        for seed in args.seeds:
            data = load_data(str(label_manifest(fraction, seed, args.runs / "manifests")), image_size=meta["image_size"],
                             progress=False)
            train, test = data.splits["train"], data.splits["test"]
            test_features = embed(test.images) if test_features is None else test_features  # the same test/ each time
            x, y = embed(train.images), train.labels.numpy()
            scale = StandardScaler().fit(x)
            with warnings.catch_warnings():  # scikit-learn's notices of its coming defaults
                warnings.simplefilter("ignore", FutureWarning)
                fit = LogisticRegressionCV(Cs=np.logspace(-4, 2, 13), cv=5, scoring="roc_auc", max_iter=5000).fit(scale.transform(x), y)
            aucs.append(roc_auc_score(test.labels.numpy(), fit.predict_proba(scale.transform(test_features))[:, 1]))
            n = len(y)
            if fraction == 1.0:
                break  # every seed draws the same 100%
        print(f"| {fraction:.0%} | {n} | {fmt(aucs)} | {', '.join(f'{a:.4f}' for a in aucs)} |", flush=True)


# -- cross-task transfer ----------------------------------------------------------------------------------

def pneumonia_subset(n: int, seed: int, root: Path) -> Path:
    """A manifest of PNG files: a stratified ``n`` of PneumoniaMNIST's training images, its whole val and test."""
    from PIL import Image

    from meddiag.data.medmnist import load_medmnist, parse_medmnist
    from meddiag.data.splits import stratified_split

    data = load_medmnist(parse_medmnist("pneumoniamnist"))  # type: ignore[arg-type]
    folder = root / f"pneumoniamnist-{n}-seed{seed}"
    manifest = folder / "manifest.csv"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    names = data.class_names
    rows = []
    for split, part in data.splits.items():
        labels = part.labels.numpy().reshape(len(part), -1)[:, 0]
        keep = np.arange(len(part))
        if split == "train":
            _, keep = stratified_split(labels, n / len(part), seed=seed)
        for i in sorted(keep):
            path = folder / f"{split}_{i:05d}.png"
            Image.fromarray(part.images[i, 0].numpy()).save(path)
            rows.append((path.name, names[int(labels[i])], split))
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return manifest


KEPT = "from the X-ray model (its stem kept: the default)"
SWITCHED = "from the X-ray model, the small-image stem (model_kwargs stem: auto)"


def switched_config(root: Path) -> Path:
    """A --config file that lets the network take the stem its image size would get without initial weights."""
    path = root / "stem-auto.yaml"
    path.write_text("model_kwargs:\n  stem: auto\n")
    return path


def cross(args: argparse.Namespace) -> None:
    os.environ.setdefault("MEDDIAG_DATA", str(SHARED / "medmnist"))  # the .npz files held here; the runs inherit it
    rows = []
    source = args.runs / "labels" / f"scratch-1-seed{args.source_seed}"
    if not (source / "report.json").exists():
        if REPORT_ONLY:
            return
        manifest = label_manifest(1.0, args.source_seed, args.runs / "manifests")
        run(["meddiag", "train", manifest, "--model", args.model, "--seed", args.source_seed, "--out", source,
             "--no-progress"], source)
    print(f"source: {source}, test AUC {test_figures(source)['auc']:.4f}", flush=True)
    for seed in args.seeds:
        subset = pneumonia_subset(200, seed, args.runs / "pneumonia-subsets")
        targets = [("PneumoniaMNIST@64, all 4708", "pneumoniamnist", 64)] + \
                  [(f"PneumoniaMNIST@{px}, 200 images", subset, px) for px in args.subset_sizes]
        for name, data, px in targets:
            full = "all" in name
            if full and not args.full_target or not full and not args.subset_target:
                continue
            epochs = args.full_epochs if full else None
            if epochs:
                name += f", {epochs} epochs"
            starts = [("scratch", "scratch", []), (KEPT, "xray-kept", ["--init-weights", source])]
            if px <= 64:  # where the automatic stem differs from the source's: the switched stem too
                starts.append((SWITCHED, "xray-switched", ["--init-weights", source, "--config", switched_config(args.runs)]))
            for arm, short, extra in starts:
                folder = (f"{'all' if full else '200'}{f'-e{epochs}' if epochs else ''}{f'-{px}px' if px != 64 else ''}"
                          f"-{short}-seed{seed}")
                out = args.runs / "cross" / folder
                cmd = ["meddiag", "train", data, "--model", args.model, "--image-size", px, "--seed", seed, "--out", out,
                       "--no-progress", *extra, *(["--epochs", epochs] if epochs else [])]
                try:
                    made = run(cmd, out)
                except NotRun:
                    continue
                rows.append({"target": name, "arm": arm, "seed": seed, **made, **test_figures(out)})
    (args.runs / "cross.json").write_text(json.dumps(rows, indent=2))
    header(args)
    print("| target | start | test AUC | ACC at 0.5 | ACC at the val-chosen Youden point | minutes per run |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["target"] for r in rows):
        for arm in ("scratch", KEPT, SWITCHED):
            mine = [r for r in rows if r["target"] == name and r["arm"] == arm]
            if not mine:
                continue
            print(f"| {name} | {arm} | " + " | ".join(fmt([r[k] for r in mine]) for k in ("auc", "acc", "acc_youden"))
                  + f" | {statistics.fmean(r['wall_min'] for r in mine):.1f} |")
    machines(rows, lambda r: f"{r['target']} {r['arm']} seed {r['seed']}")


def machines(rows: list[dict], name) -> None:
    """Where the runs of a table were made, when more than one processor or day made them (``name(row)`` says which
    run a row is): figures from different machines differ in the third place, so compare like with like."""
    made: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        made.setdefault((r["cpu"], r["date"]), []).append(name(r))
    if len(made) > 1:
        print("\nRuns by machine and date:")
        for (cpu, day), which in made.items():
            print(f"- {cpu}, {day}: {', '.join(which)}")


def header(args: argparse.Namespace) -> None:
    import torch

    print(f"\n{args.part}, seeds {' '.join(map(str, args.seeds))}, model {args.model} — {date.today()}, "
          f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("pretrain", "labels", "cross", "features"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--pretrain-epochs", type=int, default=50)
    parser.add_argument("--pretrain-more", type=int, default=None,
                        help="labels: continue the pretraining for this many more epochs (meddiag pretrain --init-weights) "
                             "and start the runs from that")
    parser.add_argument("--pretrain-config", type=Path, default=None,
                        help="a meddiag pretrain --config YAML (e.g. other views); its pretraining and the runs from it "
                             "get folders of their own, named after the file")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--arms", nargs="+", default=list(ARM_FOLDERS.values()), choices=list(ARM_FOLDERS.values()),
                        help="the starts compared")
    parser.add_argument("--extra-fractions", type=float, nargs="+", default=[0.01, 0.1],
                        help="the fractions that also get the full-learning-rate fine-tuning and the linear probe")
    parser.add_argument("--full-target", action=argparse.BooleanOptionalAction, default=True,
                        help="cross: also the whole PneumoniaMNIST training split (the long runs)")
    parser.add_argument("--subset-target", action=argparse.BooleanOptionalAction, default=True,
                        help="cross: the 200-image subset of PneumoniaMNIST")
    parser.add_argument("--subset-sizes", type=int, nargs="+", default=[64],
                        help="cross: the image sizes of the 200-image runs (128: the X-ray model's own size and stem)")
    parser.add_argument("--full-epochs", type=int, default=None,
                        help="cross: epochs of the whole-split runs (default: meddiag's; at 64 px ResNet-18 keeps the full "
                             "resolution in its first block, so an epoch costs several of the 128 px X-ray runs' epochs)")
    parser.add_argument("--source-seed", type=int, default=0, help="cross: the seed of the X-ray model used as the start")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks/transfer"))
    parser.add_argument("--report-only", action="store_true", help="tabulate the finished runs; start none")
    args = parser.parse_args()
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.part == "pretrain":
        pretrain_folder(args)
    elif args.part == "labels":
        labels(args)
    elif args.part == "features":
        features(args)
    else:
        cross(args)


if __name__ == "__main__":
    main()
