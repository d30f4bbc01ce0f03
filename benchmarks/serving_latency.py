"""PyTorch eager against ONNX Runtime for serving: single-image latency (p50/p95) and batch throughput.

    python benchmarks/serving_latency.py                       # seed_cnn@28, resnet18@28, resnet18@128
    python benchmarks/serving_latency.py --run runs/xray       # a trained run instead

Both backends go through meddiag's Predictor (uint8 image in, probabilities out: scaling,
normalisation, the network, softmax), on the same threads. Latency does not depend on the weights,
so without --run each model is a freshly initialised checkpoint. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from meddiag.models.checkpoint import ModelCard, save_checkpoint
from meddiag.serving.predictor import Predictor

from _machine import cpu_name

CASES = [("seed_cnn", 28), ("resnet18", 28), ("resnet18", 128)]


def timings(fn, repeats: int, warmup: int = 10) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return np.array(out)


def measure(checkpoint: Path, repeats: int, batches: list[int]) -> dict:
    rows = {}
    for backend in ("torch", "onnx"):
        predictor = Predictor(checkpoint, backend=backend, batch_size=max(batches))
        card = predictor.card
        shape = (card.in_channels, *(card.image_size,) * card.spatial_dims)
        rng = np.random.default_rng(0)
        one = torch.from_numpy(rng.integers(0, 256, (1, *shape), dtype=np.uint8))
        single = timings(lambda: predictor.predict_distribution(one), repeats) * 1000
        throughput = {}
        for b in batches:
            x = torch.from_numpy(rng.integers(0, 256, (b, *shape), dtype=np.uint8))
            t = timings(lambda: predictor.predict_distribution(x), max(3, repeats // (4 * b) + 3), warmup=2)
            throughput[b] = b / statistics.median(t)
        rows[backend] = {"p50": float(np.percentile(single, 50)), "p95": float(np.percentile(single, 95)), "throughput": throughput,
                         "name": f"{card.model_name} {card.image_size}px"}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, nargs="*", help="trained run folders (default: fresh models)")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = []
        if args.run:
            from meddiag.evaluation.evaluate import best_checkpoint

            checkpoints = [best_checkpoint(r) for r in args.run]
        else:
            for name, size in CASES:
                card = ModelCard(model_name=name, class_names=["normal", "pneumonia"], task="binary", image_size=size, in_channels=1)
                path = Path(tmp) / f"{name}{size}" / "checkpoints" / "best.ckpt"
                checkpoints.append(save_checkpoint(path, card.build_model(), card))
        results = [measure(c, args.repeats, args.batches) for c in checkpoints]

    print(f"\n{date.today()}, {cpu_name()}, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}\n")
    head = " | ".join(f"batch {b} img/s" for b in args.batches)
    print(f"| model | backend | 1 image p50 (ms) | 1 image p95 (ms) | {head} |")
    print("|---|---|---|---|" + "---|" * len(args.batches))
    for r in results:
        for backend in ("torch", "onnx"):
            m = r[backend]
            cols = " | ".join(f"{m['throughput'][b]:.0f}" for b in args.batches)
            print(f"| {m['name']} | {backend} | {m['p50']:.2f} | {m['p95']:.2f} | {cols} |")
        print(f"| | **ONNX speed-up** | **{r['torch']['p50'] / r['onnx']['p50']:.2f}x** | "
              f"{r['torch']['p95'] / r['onnx']['p95']:.2f}x | "
              + " | ".join(f"{r['onnx']['throughput'][b] / r['torch']['throughput'][b]:.2f}x" for b in args.batches) + " |")


if __name__ == "__main__":
    main()
