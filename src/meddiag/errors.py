"""Errors meddiag raises for problems a user can act on.

Every message names what was wrong (the file, the argument) and, where there is one,
what to do about it. The command line prints these without a traceback.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class MeddiagError(Exception):
    """A problem with the user's input or environment, with a message meant for them."""


class DataError(MeddiagError):
    """A data set, folder, manifest or file cannot be used as given."""


class ImageReadError(DataError):
    """One image file cannot be read or decoded."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class WrongKindError(ImageReadError):
    """A file meddiag reads, but not with this model: a volume given to a 2D model, or the reverse."""


class DownloadError(DataError):
    """A download failed, or its checksum did not match."""


class ModelError(MeddiagError):
    """An unknown model, or a checkpoint that cannot be used."""


class ConfigError(MeddiagError):
    """A configuration value or file is invalid."""


def failure_reason(exc: BaseException, quote: bool = True) -> str:
    """The one-line reason a file could not be used: meddiag's own message, or for anything else
    (pydicom, Pillow, nibabel, numpy...) the exception's class and, with ``quote``, its first line.
    DICOM readers pass ``quote=False``: a decoder's message may quote header values (names, dates)."""
    if isinstance(exc, ImageReadError):
        return exc.reason
    if isinstance(exc, MeddiagError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "too large to decode in the memory available"
    if isinstance(exc, RecursionError):
        return "cannot be decoded (its structure nests too deeply)"
    first = (str(exc).strip().splitlines() or [""])[0][:160] if quote else ""
    return f"cannot be decoded ({exc.__class__.__name__}{': ' + first if first else ''})"


def source_failure(exc: BaseException, source: object) -> str:
    """:func:`failure_reason` for reading ``source``; when the file at fault is another one inside it
    (a slice of a series folder), its name leads the reason."""
    reason = failure_reason(exc, quote=False)
    inner = getattr(exc, "path", None)
    if isinstance(exc, ImageReadError) and inner and inner != str(source):
        return f"{os.path.basename(inner)}: {reason}"
    return reason


def reads_one_file(func: Callable[..., T] | None = None, *, quote: bool = True) -> Any:
    """Decorate a reader whose first argument is a file (or series folder) path: whatever it raises
    besides meddiag's own errors becomes :class:`ImageReadError` naming that path with a one-line
    reason, so one bad file is reported and never takes the other files down with it."""

    def decorate(reader: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(reader)
        def wrapper(path: Any, *args: Any, **kwargs: Any) -> T:
            try:
                return reader(path, *args, **kwargs)
            except MeddiagError:
                raise
            except Exception as exc:  # noqa: BLE001 - the point: any library's failure is this file's failure
                raise ImageReadError(path, failure_reason(exc, quote)) from exc

        return wrapper

    return decorate(func) if func is not None else decorate
