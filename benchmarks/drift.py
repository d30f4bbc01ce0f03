"""Dataset shift: how often ``meddiag drift``'s batch test finds a shift in batches of 100 images, for batches
drawn from far-OOD sets, corruptions and the in-distribution data the model never saw. Prints markdown for
docs/benchmarks.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/drift.py

The model: seed_cnn trained on PneumoniaMNIST (28 px) from a manifest of its images, with 600 training
images *held back* (never trained on, never in the reference): batches drawn from them are what "the same
distribution" means. The reference is the run's own (its validation split, 524 images), stored by training
as ``meddiag drift`` uses it. Every batch is tested as ``meddiag drift`` tests it (:func:`batch_shift`, 1000
permutations, Bonferroni over the three tests); each set is drawn ``--draws`` times (a different random 100
and permutation seed each time). Far sets and corruptions as in benchmarks/ood.py.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood import corruptions, far_sets  # noqa: E402

from _machine import cpu_name

HELD_BACK = 600


def write_manifest(folder: Path, seed: int = 0) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """PNG files of PneumoniaMNIST and a manifest of all but ``HELD_BACK`` training images; returns the
    manifest, the held-back images (N, 1, 28, 28) and the test split's."""
    from meddiag.data.medmnist import load_medmnist, parse_medmnist

    data = load_medmnist(parse_medmnist("pneumoniamnist"), None)
    names = data.class_names
    held = np.random.default_rng(seed).choice(len(data.splits["train"]), HELD_BACK, replace=False)
    manifest = folder / "manifest.csv"
    lines = ["path,label,split"]
    for split, part in data.splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        skip = set(held.tolist()) if split == "train" else set()
        for i, (image, label) in enumerate(zip(part.images, part.labels)):
            if i in skip:
                continue
            path = folder / split / f"{i:05d}.png"
            if not path.exists():
                Image.fromarray(image[0].numpy()).save(path)
            lines.append(f"{split}/{i:05d}.png,{names[int(label)]},{split}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, data.splits["train"].images[torch.from_numpy(held)], data.splits["test"].images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--draws", type=int, default=20, help="batches drawn per set (held-back: twice as many)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/drift"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from meddiag.evaluation.drift import batch_shift
    from meddiag.models.checkpoint import load_ood_state
    from meddiag.models.ood import ShiftReference
    from meddiag.serving.predictor import Predictor
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    manifest, held_back, test = write_manifest(args.out / "data")
    run = args.out / "pneumoniamnist-manifest-seed_cnn"
    if not (run / "ood.json").exists():
        train_and_evaluate(TrainConfig(data=str(manifest), model="seed_cnn", epochs=args.epochs, image_size=28, out=str(run)), progress=False)
    from meddiag.training.ood import fit_ood
    from meddiag.training.run import load_training_data

    data = load_training_data(TrainConfig.from_file(run / "config.yaml"), False, run)
    fit_ood(run / "checkpoints" / "best.ckpt", data)  # the rule and references as this version of meddiag makes them
    predictor = Predictor.from_run(run)
    card = predictor.card
    reference = ShiftReference.from_state(load_ood_state(predictor.checkpoint))
    assert reference is not None
    rng = np.random.default_rng(0)
    sets = {"held back (same distribution, never seen)": held_back, "PneumoniaMNIST test split": test,
            **{f"far: {k}": v for k, v in far_sets(card.image_size, 300, rng).items()},
            **{f"corrupted held back: {k}": v for k, v in corruptions(held_back).items()}}
    print(f"date {date.today()}, {cpu_name()}, torch {torch.__version__}; seed_cnn on "
          f"PneumoniaMNIST ({args.epochs} epochs, {HELD_BACK} training images held back); OOD rule {card.ood.method}; reference: {len(reference)} "
          f"validation images; batches of {args.batch}, {args.draws} draws per set ({2 * args.draws} held back)\n", flush=True)
    print("| batch drawn from | pool | draws | shift found (p < 0.01) | no shift (p > 0.05) | median p | median p: features / classes / flagged |")
    print("|---|---|---|---|---|---|---|")
    seconds = []
    for name, images in sets.items():
        dist = predictor.predict_distribution(images)
        draws = 2 * args.draws if name.startswith("held back") else args.draws
        size = min(args.batch, len(images))
        p, parts = [], []
        for draw in range(draws if len(images) > size else 1):
            chosen = np.sort(rng.choice(len(images), size, replace=False))
            start = time.perf_counter()
            result = batch_shift(reference, card, dist["logits"][chosen], dist["features"][chosen], dist["ood_score"][chosen], seed=draw)
            seconds.append(time.perf_counter() - start)
            p.append(result["p_value"])
            parts.append([result["tests"][k]["p_value"] for k in ("features", "predicted_classes", "flagged")])
        p_arr, med = np.array(p), np.median(np.array(parts), axis=0)
        print(f"| {name} | {len(images)} | {len(p)} x {size} | {np.mean(p_arr < 0.01):.0%} | {np.mean(p_arr > 0.05):.0%} | "
              f"{np.median(p_arr):.3g} | {med[0]:.3g} / {med[1]:.3g} / {med[2]:.3g} |", flush=True)
    print(f"\nOne batch test (100 inputs against {len(reference)}, 1000 permutations x 2 tests): median "
          f"{1000 * np.median(seconds):.0f} ms")


if __name__ == "__main__":
    main()
