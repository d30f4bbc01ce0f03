"""Downloading files with a progress bar, a checksum check (md5 or sha256) and an atomic rename."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from meddiag.errors import DownloadError

_CHUNK = 1 << 20


def file_digest(path: str | Path, algorithm: str = "md5") -> str:
    """The hex digest (``md5`` or ``sha256``) of a file, read in 1 MiB chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5sum(path: str | Path) -> str:
    """The md5 hex digest of a file."""
    return file_digest(path, "md5")


def checksum_matches(expected: str, got: str) -> bool:
    """Whether hex digest ``got`` is ``expected``, or starts with it when ``expected`` is a prefix of at
    least 8 digits (torchvision's and torch.hub's file names carry the first 8 of their sha256)."""
    expected = expected.strip().lower()
    return got == expected or (8 <= len(expected) < len(got) and got.startswith(expected))


def download_file(url: str, dest: str | Path, md5: str | None = None, *, sha256: str | None = None,
                  progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, verify its checksum (``md5`` or ``sha256``, whole or a prefix of 8+
    hex digits; neither: none), then move it into place atomically.

    The data go to ``dest.<pid>.part`` first; ``dest`` only ever appears complete and
    verified. A checksum mismatch deletes the partial file and raises
    :class:`DownloadError` with both checksums.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # one per process: DDP ranks may fetch at once
    algorithm, expected = ("sha256", sha256) if sha256 is not None else ("md5", md5)
    digest = hashlib.new(algorithm, usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as fh:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), disable=not progress, transient=True,
            ) as bar:
                task = bar.add_task(f"downloading {dest.name}", total=total)
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    fh.write(chunk)
                    digest.update(chunk)
                    bar.advance(task, len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"could not download {url}: {exc}. Check the network, or place the file at {dest} yourself."
        ) from None
    got = digest.hexdigest()
    if expected is not None and not checksum_matches(expected, got):
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: expected {algorithm} {expected}, got {got}. The download is corrupt "
            f"or the server sent another file; nothing was saved to {dest}."
        )
    os.replace(part, dest)
    return dest
