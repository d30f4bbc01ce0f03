"""Out-of-distribution detection: OpenOOD's AUROC and FPR at 95% TPR for each score (MSP, energy,
Mahalanobis, kNN), per OOD set, for a model trained on PneumoniaMNIST; the in-distribution test share
flagged by the validation-chosen rule; the cost of the score in predict. Prints markdown tables for
docs/benchmarks.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/ood.py                 # seed_cnn, 20 epochs
    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/ood.py --model resnet18

Far-OOD sets (each read as the model reads a file: grayscale, resized to its input): BreastMNIST
ultrasound (its test split), HAM10000 skin photographs (converted to grayscale, so that the colour check
does not decide alone), DICOM CT/MR slices of ../shared/data/dicom, axial slices of the NIfTI volumes in
../shared/data/nifti, scikit-image's sample photographs (when scikit-image is installed) and uniform noise.
Corruptions of the in-distribution test images: inverted, a wrong window (contrast squeezed into the top
third), heavy blur, rotated 90 degrees, the top-left quarter enlarged. AUROC treats OOD as positive;
FPR95 is the share of OOD inputs kept at the threshold that keeps 95% of the in-distribution test inputs.
"""

from __future__ import annotations

import argparse
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

from _machine import cpu_name

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def as_inputs(images: list[np.ndarray], size: int) -> torch.Tensor:
    from meddiag.data.images import to_model_input

    return torch.from_numpy(np.stack([to_model_input(im, size, 1, "pad") for im in images]))


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., :3].mean(axis=2).astype(np.uint8)


def far_sets(size: int, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    from meddiag.data.dicom import read_dicom
    from meddiag.data.images import dicom_as_2d, read_image
    from meddiag.data.medmnist import load_medmnist, parse_medmnist
    from meddiag.data.volumes import read_nifti

    sets: dict[str, torch.Tensor] = {}
    breast = load_medmnist(parse_medmnist("breastmnist"), None).splits["test"].images[:n]
    sets["BreastMNIST ultrasound"] = torch.nn.functional.interpolate(breast.float(), size=(size, size)).round().byte()
    skin = sorted((SHARED / "dermatology" / "ham10000_subset" / "images").glob("*.jpg"))[:n]
    sets["HAM10000 skin (grayscale)"] = as_inputs([gray(read_image(p)) for p in skin], size)
    slices = []
    for path in sorted((SHARED / "dicom").rglob("*")):
        if len(slices) >= n or not path.is_file():
            continue
        try:
            image = read_dicom(path)
        except Exception:  # noqa: BLE001 - a test file without an image, or one a decoder refuses
            continue
        if image.pixels.ndim == 2 and min(image.pixels.shape) >= 32:
            slices.append(gray(dicom_as_2d(image, path)))
    sets["DICOM CT/MR slices"] = as_inputs(slices, size)
    volume_slices = []
    for path in sorted((SHARED / "nifti").rglob("*.nii*")):
        try:
            volume = read_nifti(path, 0)
        except Exception:  # noqa: BLE001 - e.g. a 4D file
            continue
        data = volume.array
        for z in np.linspace(data.shape[2] * 0.3, data.shape[2] * 0.7, 12).astype(int):
            s = data[:, :, z].astype(np.float64)
            lo, hi = np.percentile(s, [1, 99])
            volume_slices.append(np.clip((s - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8))
    sets["NIfTI CT/MR slices"] = as_inputs(volume_slices[:n], size)
    try:
        from skimage import data as skdata

        photos = [getattr(skdata, name)() for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "moon",
                                                        "page", "text", "brick", "grass", "gravel", "coins")]
        sets["scikit-image photographs"] = as_inputs([gray(p) for p in photos], size)
    except ImportError:
        print("scikit-image not installed: its photographs are left out", flush=True)
    sets["uniform noise"] = torch.from_numpy(rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8))
    return sets


def corruptions(test: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    x = test.float()
    size = x.shape[-1]
    kernel = torch.ones(1, 1, 9, 9) / 81
    return {
        "inverted": (255 - x).byte(),
        "wrong window": (170 + x / 3).round().byte(),
        "heavy blur": F.conv2d(F.pad(x, (4, 4, 4, 4), mode="replicate"), kernel).round().clamp(0, 255).byte(),
        "rotated 90°": torch.rot90(x, 1, dims=(2, 3)).byte(),
        "quarter enlarged": F.interpolate(x[..., : size // 2, : size // 2], size=(size, size), mode="bilinear").round().byte(),
    }


def auroc_fpr95(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[float, float]:
    from meddiag.evaluation.metrics import roc_auc

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    auroc = roc_auc(labels, np.r_[in_scores, out_scores])
    threshold = np.quantile(in_scores, 0.95)
    return auroc, float(np.mean(out_scores <= threshold))


def print_table(in_scores: dict[str, np.ndarray], groups: dict[str, torch.Tensor], scores, methods: tuple[str, ...]) -> None:  # noqa: ANN001 - scores: images -> {method: (N,)}
    """The markdown table: per OOD set, each method's AUROC / FPR95 against the in-distribution scores."""
    print("| OOD set | n | " + " | ".join(f"{m} AUROC / FPR95" for m in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for name, images in groups.items():
        out = scores(images)
        cells = [f"{a:.4f} / {f:.3f}" for a, f in (auroc_fpr95(in_scores[m], out[m]) for m in methods)]
        print(f"| {name} | {len(images)} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--data", default="pneumoniamnist", help="MedMNIST name or image folder (e.g. the Kermany chest X-rays)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n", type=int, default=200, help="images per far-OOD set (at most)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/ood"))
    parser.add_argument("--method", default=None, help="the rule's method (default: meddiag's)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from meddiag.models.checkpoint import load_checkpoint, load_ood_state
    from meddiag.models.ood import COMBINED, METHODS, FeatureReference, all_scores, logits_and_features
    from meddiag.serving.predictor import Predictor
    from meddiag.training.config import TrainConfig
    from meddiag.training.ood import fit_ood
    from meddiag.training.run import load_training_data
    from meddiag.workflow import train_and_evaluate

    tag = Path(args.data).name if Path(args.data).exists() else args.data
    run = args.out / f"{tag}-{args.model}{f'-{args.image_size}' if args.image_size else ''}"
    config = TrainConfig(data=args.data, model=args.model, epochs=args.epochs, out=str(run), image_size=args.image_size)
    if not (run / "ood.json").exists():
        train_and_evaluate(config, progress=False)
    checkpoint = run / "checkpoints" / "best.ckpt"
    data = load_training_data(TrainConfig.from_file(run / "config.yaml"), False, run)
    fit_ood(checkpoint, data, 0.95, args.method)  # the rule and reference as this version of meddiag makes them
    model, card = load_checkpoint(checkpoint)
    reference = FeatureReference.from_state(load_ood_state(checkpoint))
    test = data.splits["test"].images
    scales = {m: card.ood.thresholds[m] for m in COMBINED}

    def scores(images: torch.Tensor) -> dict[str, np.ndarray]:
        logits, features = logits_and_features(model, card, images)
        return all_scores(logits, features, reference, card.task, card.temperature, images=images, scales=scales)

    rng = np.random.default_rng(0)
    in_scores = scores(test)
    print(f"date {date.today()}, {cpu_name()}, torch {torch.__version__}; {args.model} on "
          f"{tag} at {card.image_size} px, {args.epochs} epochs; rule {card.ood.method} keeping {card.ood.keep:.0%} of "
          f"{card.ood.validation_images} validation images\n", flush=True)
    flagged = {m: float(np.mean(in_scores[m] > card.ood.thresholds[m])) for m in METHODS}
    print("In-distribution test images flagged by each method's validation threshold (target <= 6%): "
          + ", ".join(f"{m} {100 * v:.1f}%" for m, v in flagged.items()) + "\n")
    groups = {**{f"far: {k}": v for k, v in far_sets(card.image_size, args.n, rng).items()},
              **{f"corrupted: {k}": v for k, v in corruptions(test).items()}}
    print_table(in_scores, groups, scores, METHODS)
    predictor = Predictor.from_run(run)
    batch = test[:256]
    timings: dict[str, list[float]] = {"with the OOD score": [], "without": []}
    for _ in range(10):  # alternating rounds, so that both see the same machine state
        for label, rule in (("with the OOD score", card.ood), ("without", None)):
            predictor.card = card.model_copy(update={"ood": rule})
            predictor.predict_distribution(batch)
            start = time.perf_counter()
            for _ in range(5):
                predictor.predict_distribution(batch)
            timings[label].append((time.perf_counter() - start) / 5)
    timings = {k: float(np.median(v)) for k, v in timings.items()}  # type: ignore[misc]
    print(f"\npredict_distribution on 256 test images (median of 10 alternating rounds of 5): "
          f"{1000 * timings['without']:.1f} ms without the OOD score, "
          f"{1000 * timings['with the OOD score']:.1f} ms with it "
          f"({100 * (timings['with the OOD score'] / timings['without'] - 1):+.0f}%)")


if __name__ == "__main__":
    main()
