"""A bounded load test of ``meddiag serve``: N concurrent clients for S seconds against 127.0.0.1.

    python benchmarks/load_test.py --run runs/xray --image ../shared/data/xray/.../IM-0001-0001.jpeg
    python benchmarks/load_test.py                       # a fresh resnet18@128 and a synthetic X-ray-sized PNG

Starts the server as a user would (``meddiag serve``), waits for /readyz, then each client posts
one image at a time to /v1/predict (a new request as soon as the last one is answered) for the
duration. Reports errors, latency p50/p95/p99, throughput, and the server's resident memory
(sampled every second from /proc) at the start and end of the load and at its peak. Run it with
micro-batching (default) and with ``--max-batch 1`` to see what batching is worth.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

from _machine import cpu_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "meddiagloadtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def client(url: str, body: bytes, content_type: str, until: float, latencies: list, errors: list, token: str | None) -> None:
    import httpx

    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {token}"} if token else {})}
    async with httpx.AsyncClient(timeout=60) as http:
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                r = await http.post(url, content=body, headers=headers)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:120]}")
                    continue
            except Exception as exc:  # noqa: BLE001 - every failure counts as an error
                errors.append(f"{exc.__class__.__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - start)


async def load(url: str, body: bytes, content_type: str, clients: int, seconds: float, pid: int, token: str | None) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    memory: list[float] = [rss_mb(pid)]
    start = time.perf_counter()
    until = start + seconds

    async def sample() -> None:
        while time.perf_counter() < until:
            await asyncio.sleep(1.0)
            memory.append(rss_mb(pid))

    await asyncio.gather(sample(), *(client(url, body, content_type, until, latencies, errors, token) for _ in range(clients)))
    wall = time.perf_counter() - start
    memory.append(rss_mb(pid))
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
            "throughput": len(latencies) / wall, "p50": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p95": float(np.percentile(ms, 95)) if len(ms) else float("nan"),
            "p99": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "rss_start": memory[0], "rss_end": memory[-1], "rss_max": max(memory), "rss_trace": memory[::10]}


def fresh_run(tmp: Path, model: str, size: int) -> Path:
    from meddiag.models.checkpoint import ModelCard, save_checkpoint

    card = ModelCard(model_name=model, class_names=["normal", "pneumonia"], task="binary", image_size=size, in_channels=1)
    save_checkpoint(tmp / "run" / "checkpoints" / "best.ckpt", card.build_model(), card)
    return tmp / "run"


def synthetic_xray() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.normal(120, 40, (1024, 1024)).clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run (default: a fresh model, --model at --size)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--image", type=Path, help="the image every request sends (default: a synthetic 1024x1024 PNG)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--explain", default=None, help="e.g. gradcam: every request also asks for a heatmap")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or fresh_run(Path(tmp), args.model, args.size)
        data = args.image.read_bytes() if args.image else synthetic_xray()
        port, token = free_port(), "load-test-token"
        log = open(Path(tmp) / "server.log", "w")
        env = {**os.environ, "MEDDIAG_TOKEN": token}
        server = subprocess.Popen([sys.executable, "-m", "meddiag", "serve", str(run), "--port", str(port), "--backend", args.backend,
                                   "--max-batch", str(args.max_batch)], stdout=log, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if urllib.request.urlopen(base + "/readyz", timeout=2).status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    sys.exit("server did not start:\n" + (Path(tmp) / "server.log").read_text())
                time.sleep(0.5)
            body, content_type = multipart("image" + (args.image.suffix if args.image else ".png"), data)
            url = base + "/v1/predict" + (f"?explain={args.explain}" if args.explain else "")
            asyncio.run(load(url, body, content_type, 4, 5, server.pid, token))  # warm-up, not reported
            result = asyncio.run(load(url, body, content_type, args.clients, args.seconds, server.pid, token))
            stats = urllib.request.urlopen(urllib.request.Request(base + "/v1/model", headers={"Authorization": f"Bearer {token}"}))
            batching = __import__("json").loads(stats.read())["batching"]
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()

    print(f"\n{date.today()}, {cpu_name()}, {os.cpu_count()} cores; server and clients on this machine")
    print(f"model {args.run or f'{args.model}@{args.size} (fresh weights)'}, backend {args.backend}, max batch {args.max_batch}, "
          f"explain {args.explain or 'no'}; image {len(data) / 1024:.0f} KB; {args.clients} clients for {args.seconds:.0f} s\n")
    print("| requests | errors | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | mean batch | server RSS start → end (max) MB |")
    print("|---|---|---|---|---|---|---|---|")
    r = result
    print(f"| {r['requests']} | {r['errors']} | {r['throughput']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
          f"{batching['mean_batch']:.1f} | {r['rss_start']:.0f} → {r['rss_end']:.0f} ({r['rss_max']:.0f}) |")
    print("\nserver RSS every 10 s (MB):", " ".join(f"{m:.0f}" for m in r["rss_trace"]))
    if r["errors"]:
        print("first errors:", *r["first_errors"], sep="\n  ")


if __name__ == "__main__":
    main()
