"""Downloading files with a progress bar, an md5 check and an atomic rename."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from meddiag.errors import DownloadError

_CHUNK = 1 << 20


def md5sum(path: str | Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, md5: str | None, *, progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, verify its md5, then move it into place atomically.

    The data go to ``dest + ".part"`` first; ``dest`` only ever appears complete and
    verified. A checksum mismatch deletes the partial file and raises
    :class:`DownloadError` with both checksums.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
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
    if md5 is not None and got != md5:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {got}. The download is corrupt "
            f"or the server sent another file; nothing was saved to {dest}."
        )
    os.replace(part, dest)
    return dest
