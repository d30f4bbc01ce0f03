"""Quality bars of the foundation: default training on PneumoniaMNIST and the chest X-ray folder,
seed_cnn against resnet18 on both. Prints a markdown table for docs/benchmarks.md.

    MEDDIAG_DATA=../shared/data/medmnist python benchmarks/foundation.py [--only NAME ...] [--runs DIR]

Each configuration runs the real command line (`meddiag train ...`, defaults unless stated) in its own
run folder and reports test metrics from its metrics.json, the wall time of the whole command and the
model's parameter count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _machine import cpu_name

XRAY = Path(__file__).resolve().parents[2] / "shared" / "data" / "xray" / "chest_xray_pneumonia_kermany_224"

CONFIGS = {
    "pneumoniamnist-resnet18": ["pneumoniamnist", "--model", "resnet18"],
    "pneumoniamnist-seed_cnn": ["pneumoniamnist", "--model", "seed_cnn"],
    "xray-resnet18": [str(XRAY), "--model", "resnet18"],
    "xray-seed_cnn": [str(XRAY), "--model", "seed_cnn"],
}


def run(name: str, args: list[str], runs: Path) -> dict:
    out = runs / name
    cmd = ["meddiag", "train", *args, "--out", str(out), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    from meddiag.models import count_parameters, load_checkpoint

    model, card = load_checkpoint(out / "checkpoints" / "best.ckpt")
    positive = card.class_names[-1]
    epochs = sum(1 for _ in open(out / "history.csv")) - 1
    row = {
        "config": name, "command": "meddiag train " + " ".join(args), "auc": metrics["auc"], "acc": metrics["acc"],
        "sensitivity": metrics["per_class"][positive]["sensitivity"],
        "specificity": metrics["per_class"][positive]["specificity"],
        "params": count_parameters(model), "epochs": epochs, "wall_min": wall / 60, "image_size": card.image_size,
    }
    (out / "benchmark.json").write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--runs", type=Path, default=Path("runs/benchmarks"), help="where the run folders go")
    args = parser.parse_args()
    rows = [run(name, CONFIGS[name], args.runs) for name in (args.only or CONFIGS)]
    print(f"\n{date.today()} · {cpu_name()} · {os.cpu_count()} cores · Python {platform.python_version()}\n")
    print("| configuration | px | params | epochs | test AUC | test ACC | sensitivity | specificity | wall time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['image_size']} | {r['params'] / 1e6:.1f} M | {r['epochs']} | {r['auc']:.4f} | "
              f"{r['acc']:.4f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} | {r['wall_min']:.1f} min |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
