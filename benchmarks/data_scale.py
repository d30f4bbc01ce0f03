"""Data larger than memory (issue 19): the prepared-image cache and training from disk, on a generated folder of
radiograph-like PNG files. Prints markdown tables for docs/benchmarks.md.

    python benchmarks/data_scale.py make --n 100000          # the folder (256 px PNG; a few GB; not committed)
    python benchmarks/data_scale.py formats                  # how to store prepared arrays: per-file .npy vs shards
    python benchmarks/data_scale.py decode --n 5000          # first pass: threads against processes (and --dicom)
    python benchmarks/data_scale.py runs --sizes 10000 100000 --seconds 240   # first/second run, RSS, throughput

Images: a smooth "anatomy" (a bright ellipse of body, two darker lung fields, low-frequency texture and
noise), and for the finding class a soft round opacity somewhere in a lung field, so they compress like
radiographs (about 30 KB each) and a network has something to learn. The folder is ROOT/{normal,finding}/;
meddiag carves its validation and test splits. A size N uses a manifest of the first N files.

``runs`` measures, for each size, with an empty cache and then again: the time to the first training step
(from the command's start to the line it prints as training begins), the first pass's decode rate, and the
resident memory (VmRSS, sampled every 0.2 s; peak over the first ``--seconds`` of the epoch); and on the
smallest size the epoch's throughput in memory against from the cache (``--memory-mb 0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

from _machine import cpu_name

ROOT = Path("runs/benchmarks/data_scale")


def radiograph(label: int, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A uint8 (size, size) chest-radiograph-like image; ``label`` 1 adds a round opacity in a lung field."""
    y, x = np.mgrid[:size, :size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 2 + ((y - 0.55) / 0.5) ** 4) * 2)
    lungs = sum(np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.5) / 0.25) ** 2)) for cx in (0.33 + rng.normal(0, 0.01), 0.67))
    coarse = rng.normal(0, 1, (8, 8))
    texture = np.kron(coarse, np.ones((size // 8, size // 8)))
    texture = np.real(np.fft.ifft2(np.fft.fft2(texture) * np.exp(-((np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None] ** 2) * 900))))
    img = 60 + 150 * body - 70 * lungs + 12 * texture / (np.abs(texture).max() + 1e-6) + rng.normal(0, 3, (size, size))
    if label:
        cx, cy, r = rng.choice([0.33, 0.67]) + rng.normal(0, 0.04), 0.5 + rng.normal(0, 0.08), rng.uniform(0.04, 0.08)
        img += 45 * np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2)))
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_chunk(args: tuple[Path, int, int, int]) -> int:
    from PIL import Image

    root, start, stop, seed = args
    for i in range(start, stop):
        rng = np.random.default_rng(seed * 1_000_003 + i)
        label = i % 4 == 0  # 25% with the finding
        path = root / ("finding" if label else "normal") / f"img{i:06d}.png"
        if not path.exists():
            Image.fromarray(radiograph(int(label), rng)).save(path, optimize=False)
    return stop - start


def make(args: argparse.Namespace) -> None:
    root = args.root / "images"
    for name in ("normal", "finding"):
        (root / name).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = [(root, s, min(args.n, s + 1000), 0) for s in range(0, args.n, 1000)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        done = sum(pool.map(_make_chunk, chunks))
    size = sum(p.stat().st_size for p in root.rglob("*.png"))
    print(f"{done} images in {root}, {size / 2**30:.2f} GiB ({size / done / 1024:.1f} KiB each), {time.perf_counter() - start:.0f} s")


def manifest(args: argparse.Namespace, n: int) -> Path:
    root = args.root / "images"
    files = sorted(root.rglob("*.png"), key=lambda p: p.name)[:n]
    path = args.root / f"manifest-{n}.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows((str(p.resolve()), p.parent.name) for p in files)
    return path


# -- storage formats --------------------------------------------------------------------------------------

def formats(args: argparse.Namespace) -> None:
    """Write and read back N prepared 128 px arrays: one .npy file each, against slots of one shard (pread)
    and np.memmap of the same shard; reads in random order, as a shuffled epoch does."""
    n, shape = args.n, (1, 128, 128)
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 255, (min(n, 2000), *shape), dtype=np.uint8)
    out = args.root / "formats"
    shutil.rmtree(out, ignore_errors=True)
    (out / "npy").mkdir(parents=True)
    order = rng.permutation(n)
    rows = []
    start = time.perf_counter()
    for i in range(n):
        np.save(out / "npy" / f"{i:06d}.npy", arrays[i % len(arrays)])
    write_npy = time.perf_counter() - start
    start = time.perf_counter()
    for i in order:
        np.load(out / "npy" / f"{i:06d}.npy")
    rows.append(("one .npy file each", write_npy, time.perf_counter() - start))
    start = time.perf_counter()
    fd = os.open(out / "shard.u8", os.O_WRONLY | os.O_CREAT)
    nbytes = int(np.prod(shape))
    for i in range(n):
        os.pwrite(fd, arrays[i % len(arrays)].tobytes(), i * nbytes)
    os.fsync(fd)
    os.close(fd)
    write_shard = time.perf_counter() - start
    fd = os.open(out / "shard.u8", os.O_RDONLY)
    buf = np.empty(shape, np.uint8)
    start = time.perf_counter()
    for i in order:
        os.preadv(fd, [memoryview(buf.reshape(-1))], int(i) * nbytes)
    rows.append(("shard, os.pread (meddiag)", write_shard, time.perf_counter() - start))
    os.close(fd)
    mm = np.memmap(out / "shard.u8", dtype=np.uint8, mode="r", shape=(n, *shape))
    start = time.perf_counter()
    for i in order:
        np.array(mm[i])
    rows.append(("shard, np.memmap", write_shard, time.perf_counter() - start))
    header(args, f"storage formats, {n} arrays of 128x128 uint8 (page cache warm)")
    print("| format | write, µs per array | read in random order, µs per array |")
    print("|---|---|---|")
    for name, w, r in rows:
        print(f"| {name} | {w / n * 1e6:.0f} | {r / n * 1e6:.1f} |")
    shutil.rmtree(out, ignore_errors=True)


# -- first pass: threads or processes ---------------------------------------------------------------------

def _prepare(path: str) -> int:
    from meddiag.data.images import read_image, to_model_input

    return int(to_model_input(read_image(path), 128, 1, "pad").sum() > 0)


SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "vs_seg_001_t1_series"


def decode(args: argparse.Namespace) -> None:
    if args.dicom:  # 512x512 16-bit MR slices, each read args.n // 120 times over
        slices = sorted(str(p) for p in SERIES.iterdir() if p.is_file())
        files = (slices * (args.n // len(slices) + 1))[: args.n]
        what = f"{len(files)} reads of the 120 DICOM files (512x512, 16-bit MR) of {SERIES.name}"
    else:
        files = [str(p) for p in sorted((args.root / "images").rglob("*.png"), key=lambda p: p.name)[: args.n]]
        what = f"{len(files)} PNG files of 256 px"
    rows = []
    pools = (("threads (meddiag, under 2,000 files)", ThreadPoolExecutor, 8),
             ("processes (meddiag, from 2,000 files)", ProcessPoolExecutor, os.cpu_count()))
    for name, pool_type, workers in pools:
        start = time.perf_counter()
        with pool_type(workers) as pool:
            list(pool.map(_prepare, files, chunksize=64))
        rows.append((name, workers, len(files) / (time.perf_counter() - start)))
    header(args, f"first pass over {what}, prepared at 128 px (read_image + to_model_input)")
    print("| pool | workers | images/s |")
    print("|---|---|---|")
    for name, workers, rate in rows:
        print(f"| {name} | {workers} | {rate:.0f} |")


# -- runs: first and second, memory, throughput -------------------------------------------------------------

def watch(command: list[str], seconds: float, env: dict) -> dict:
    """Run ``command``; the time to its 'training ... ->' line, then VmRSS every 0.2 s for ``seconds`` (or to
    its end); it is stopped after that. Returns times and the RSS peak (MiB) before and during training."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    marks: dict = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("training ") and "->" in line and "trained" not in marks:
                marks["trained"] = time.perf_counter() - start
            if line.startswith("epoch 1/") and "epoch" not in marks:
                marks["epoch"] = time.perf_counter() - start
                marks["epoch_line"] = line.strip()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    loading_peak = training_peak = 0.0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024
        except (OSError, StopIteration):
            break
        if "trained" in marks:
            training_peak = max(training_peak, rss)
            if time.perf_counter() - start - marks["trained"] > seconds:
                proc.kill()
                break
        else:
            loading_peak = max(loading_peak, rss)
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=5)
    if "trained" not in marks:
        raise SystemExit("".join(lines[-20:]))
    return {"to_first_step_s": marks["trained"], "loading_rss_mib": loading_peak, "training_rss_mib": training_peak,
            "epoch_s": float(marks["epoch_line"].split()[-1].rstrip("s")) if "epoch_line" in marks else None}


def runs(args: argparse.Namespace) -> None:
    rows = []
    env = {**os.environ, "MEDDIAG_CACHE": str(args.root / "cache")}
    for n in args.sizes:
        data = manifest(args, n)
        shutil.rmtree(args.root / "cache", ignore_errors=True)
        for attempt in ("without the cache (--cache off)", "first run (empty cache)", "second run"):
            out = args.root / f"run-{n}-{attempt.split()[0]}"
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "meddiag", "train", str(data), "--model", args.model, "--epochs", "1",
                       "--out", str(out), "--no-progress", *(["--cache", "off"] if "off" in attempt else [])]
            got = watch(command, args.seconds, env)
            rows.append({"n": n, "run": attempt, **got})
            print(rows[-1], flush=True)
    cache_bytes = sum(p.stat().st_size for p in (args.root / "cache").rglob("*.u8"))
    throughput = []
    n = min(args.sizes)
    data = manifest(args, n)
    for name, memory in (("in memory", "100000"), ("from the cache (--memory-mb 0)", "0")):
        out = args.root / f"throughput-{memory}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "meddiag", "train", str(data), "--model", args.model, "--epochs", "1", "--memory-mb",
                   memory, "--out", str(out), "--no-progress"]
        got = watch(command, 1e9, env)
        history = list(csv.DictReader(open(out / "history.csv")))
        throughput.append((name, float(history[0]["time_s"]), got["training_rss_mib"]))
    (args.root / "runs.json").write_text(json.dumps({"rows": rows, "throughput": throughput}, indent=2))
    header(args, f"meddiag train MANIFEST --model {args.model} --epochs 1 (128 px; default --memory-mb 1024)")
    print("| images | run | time to the first training step | images/s to it | peak RSS while loading | "
          f"peak RSS training (first {args.seconds:.0f} s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['n'] / r['to_first_step_s']:.0f}" if not r["run"].startswith("second") else "–"
        print(f"| {r['n']:,} | {r['run']} | {r['to_first_step_s']:.1f} s | {rate} | {r['loading_rss_mib']:.0f} MiB | "
              f"{r['training_rss_mib']:.0f} MiB |")
    print(f"\ncache after the largest size: {cache_bytes / 2**30:.2f} GiB")
    print(f"\n| {n:,} images, one epoch | epoch time | images/s | peak RSS |\n|---|---|---|---|")
    train_images = round(n * 0.7)
    for name, seconds, rss in throughput:
        print(f"| {name} | {seconds:.1f} s | {train_images / seconds:.0f} | {rss:.0f} MiB |")
    print(f"\nfrom the cache / in memory: {throughput[0][1] / throughput[1][1]:.2f}x the throughput")


def header(args: argparse.Namespace, what: str) -> None:
    print(f"\n{what} — {date.today()}, {cpu_name()}, {os.cpu_count()} CPUs\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("make", "formats", "decode", "runs"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--seconds", type=float, default=240, help="runs: how long into the epoch RSS is watched")
    parser.add_argument("--model", default="resnet18",
                        help="runs: the network (seed_cnn at 128 px holds a 51M-parameter dense layer: its RSS is the model's)")
    parser.add_argument("--dicom", action="store_true", help="decode: DICOM slices instead of the PNG folder")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    {"make": make, "formats": formats, "decode": decode, "runs": runs}[args.part](args)


if __name__ == "__main__":
    main()
