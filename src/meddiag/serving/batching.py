"""Micro-batching: concurrent requests share one forward pass.

Each request submits its inputs; a single worker takes what is waiting, waits up to ``max_wait``
seconds for more (never beyond ``max_batch`` inputs), runs the model once on all of them in a
worker thread and hands every request its own rows. One forward pass at a time also keeps the
CPU's threads from being oversubscribed by concurrent requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Job:
    arrays: tuple[np.ndarray, ...]  # row-aligned inputs (the images; and their covariates, for a fused model)
    future: asyncio.Future

    def __len__(self) -> int:
        return len(self.arrays[0])


@dataclass
class BatchStats:
    batches: int = 0
    inputs: int = 0
    largest: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"batches": self.batches, "inputs": self.inputs, "largest_batch": self.largest,
                "mean_batch": self.inputs / self.batches if self.batches else 0.0, "busy_s": round(self.busy_s, 3)}


class MicroBatcher:
    """``await batcher.submit(arrays, ...)`` -> ``fn(arrays, ...)`` for those rows, batched with others.

    ``fn`` maps one or more row-aligned (N, ...) arrays (images; their covariates) to a dict of arrays
    with N rows each. It runs on ``executor`` (one thread by default, so passes never overlap)."""

    def __init__(self, fn: Callable[..., dict[str, np.ndarray]], max_batch: int = 32, max_wait: float = 0.005,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.fn, self.max_batch, self.max_wait = fn, max(1, max_batch), max(0.0, max_wait)
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="meddiag-model")
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        job = _Job(arrays, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._queue = self._worker = None

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0])
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    job = self._queue.get_nowait() if loop.time() >= deadline else \
                        await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                jobs.append(job)
                size += len(job)
            batch = tuple(np.concatenate(parts) for parts in zip(*(j.arrays for j in jobs))) if len(jobs) > 1 else jobs[0].arrays
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self.executor, self.fn, *batch)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self._record(len(batch[0]), time.perf_counter() - start)
            offset = 0
            for j in jobs:
                n = len(j)
                if not j.future.done():
                    j.future.set_result({k: v[offset : offset + n] for k, v in out.items()})
                offset += n

    def _record(self, n: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.inputs += n
        s.largest = max(s.largest, n)
        s.busy_s += seconds
        s.sizes[n] = s.sizes.get(n, 0) + 1
