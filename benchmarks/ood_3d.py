"""Out-of-distribution detection for a 3D model: AUROC and FPR95 of each score for seed_cnn (3D) trained on
AdrenalMNIST3D, against the volumes in ../shared/data (NIfTI CT/MR volumes and a DICOM MR series, whole and
as their eight octants), uniform noise, and corruptions of the test volumes. Prints markdown for
docs/benchmarks.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/ood_3d.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ood import SHARED, print_table  # noqa: E402

from _machine import cpu_name


def far_volumes(size: int, rng: np.random.Generator, n_noise: int) -> dict[str, torch.Tensor]:
    """The shared volumes as the model reads a file (its input size), whole and as octants; noise."""
    import torch.nn.functional as F

    from meddiag.data.volumes import read_volumes, volume_to_model_input

    sources = [p for p in sorted((SHARED / "nifti").rglob("*.nii*"))] + [SHARED / "dicom" / "vs_seg_001_t1_series"]
    whole, octants = [], []
    for path in sources:
        try:
            volumes = read_volumes(path, 0)  # a 4D file: its first volume
        except Exception:  # noqa: BLE001 - a file that is not a volume
            continue
        for v in volumes:
            x = torch.from_numpy(volume_to_model_input(v, 2 * size, 1, None, "pad"))[None].float()
            whole.append(F.interpolate(x, size=(size,) * 3, mode="trilinear").round().byte()[0])
            for a in (0, size):
                for b in (0, size):
                    for c in (0, size):
                        octants.append(x[0, :, a : a + size, b : b + size, c : c + size].round().byte())
    return {"NIfTI / DICOM CT and MR volumes": torch.stack(whole), "their octants": torch.stack(octants),
            "uniform noise": torch.from_numpy(rng.integers(0, 256, (n_noise, 1, size, size, size), dtype=np.uint8))}


def corruptions(test: torch.Tensor) -> dict[str, torch.Tensor]:
    import torch.nn.functional as F

    x = test.float()
    return {"inverted": (255 - x).byte(),
            "heavy blur": F.avg_pool3d(F.pad(x, (2,) * 6, mode="replicate"), 5, 1).round().clamp(0, 255).byte(),
            "rotated 90°": torch.rot90(x, 1, dims=(3, 4)).byte(),
            "wrong window": (170 + x / 3).round().byte()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/ood"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from meddiag.models.checkpoint import load_checkpoint, load_ood_state
    from meddiag.models.ood import COMBINED, METHODS, FeatureReference, all_scores, logits_and_features
    from meddiag.training.config import TrainConfig
    from meddiag.training.ood import fit_ood
    from meddiag.training.run import load_training_data
    from meddiag.workflow import train_and_evaluate

    run = args.out / "adrenalmnist3d-seed_cnn"
    if not (run / "ood.json").exists():
        train_and_evaluate(TrainConfig(data="adrenalmnist3d", model="seed_cnn", epochs=args.epochs, out=str(run)), progress=False)
    checkpoint = run / "checkpoints" / "best.ckpt"
    data = load_training_data(TrainConfig.from_file(run / "config.yaml"), False, run)
    fit_ood(checkpoint, data)
    model, card = load_checkpoint(checkpoint)
    reference = FeatureReference.from_state(load_ood_state(checkpoint))
    scales = {m: card.ood.thresholds[m] for m in COMBINED}
    test = data.splits["test"].images

    def scores(images: torch.Tensor) -> dict[str, np.ndarray]:
        logits, features = logits_and_features(model, card, images, batch_size=32)
        return all_scores(logits, features, reference, card.task, card.temperature, images=images, scales=scales)

    in_scores = scores(test)
    print(f"date {date.today()}, {cpu_name()}, torch {torch.__version__}; seed_cnn (3D) on "
          f"AdrenalMNIST3D at {card.image_size}^3, {args.epochs} epochs; rule {card.ood.method} keeping {card.ood.keep:.0%} of "
          f"{card.ood.validation_images} validation volumes; {len(test)} test volumes\n")
    print("In-distribution test volumes flagged by each method's validation threshold (target <= 6%): "
          + ", ".join(f"{m} {100 * float(np.mean(in_scores[m] > card.ood.thresholds[m])):.1f}%" for m in METHODS) + "\n")
    groups = {**{f"far: {k}": v for k, v in far_volumes(card.image_size, np.random.default_rng(0), 100).items()},
              **{f"corrupted: {k}": v for k, v in corruptions(test).items()}}
    print_table(in_scores, groups, scores, METHODS)


if __name__ == "__main__":
    main()
