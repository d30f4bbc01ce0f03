"""Uploaded files, handled safely: the type is read from the content (never from the client's file
name), the file is written under a name the server chooses into a private folder, read, and
deleted at once."""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meddiag.data.dicom import looks_like_dicom

# kind -> (suffix the readers recognise, what to call it in messages)
KINDS = {
    "png": (".png", "PNG"), "jpeg": (".jpg", "JPEG"), "bmp": (".bmp", "BMP"), "tiff": (".tif", "TIFF"),
    "dicom": (".dcm", "DICOM"), "nifti": (".nii", "NIfTI"), "nifti-gz": (".nii.gz", "NIfTI (gzip)"),
}
VOLUME_KINDS = ("nifti", "nifti-gz")
SUPPORTED = "PNG, JPEG, BMP, TIFF, DICOM (Part 10) or NIfTI (.nii, .nii.gz)"


class UnsupportedUpload(ValueError):
    """The content is none of the formats meddiag reads."""


def sniff(head: bytes) -> str:
    """The kind of file whose first bytes (at least 352 of them when there are) are ``head``."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if looks_like_dicom(head):  # Part 10, or a data set without the preamble
        return "dicom"
    if _is_nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:
            inner = gzip.GzipFile(fileobj=_Prefix(head)).read(544)
        except (OSError, EOFError):
            inner = b""
        if _is_nifti_header(inner):
            return "nifti-gz"
    raise UnsupportedUpload(f"not a {SUPPORTED} file")


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return struct.unpack("<i", head[:4])[0] == 348 or struct.unpack(">i", head[:4])[0] == 348
    return len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00")


class _Prefix:
    """A read-only stream over the first bytes of a file (gzip needs a file object)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n is None or n < 0 else self.pos + n
        out, self.pos = self.data[self.pos : end], min(end, len(self.data))
        return out


def display_name(client_name: str | None, index: int) -> str:
    """How the client's file is named in messages: its base name, printable, at most 100
    characters; ``upload <index>`` without one. Never used as a path."""
    name = re.sub(r"[^\w .,()+=@#-]", "_", os.path.basename((client_name or "").replace("\\", "/")))[:100]
    return name or f"upload {index}"


@contextlib.contextmanager
def stored_upload(data: bytes, kind: str, folder: str | Path | None = None) -> Iterator[Path]:
    """``data`` as a temporary file with the suffix of ``kind`` (the readers go by suffix), in a
    fresh private folder (mode 0700), deleted on exit whatever happens."""
    with tempfile.TemporaryDirectory(prefix="meddiag-upload-", dir=folder) as tmp:
        path = Path(tmp) / f"upload{KINDS[kind][0]}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path
