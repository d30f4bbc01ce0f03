"""Errors meddiag raises for problems a user can act on.

Every message names what was wrong (the file, the argument) and, where there is one,
what to do about it. The command line prints these without a traceback.
"""

from __future__ import annotations


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


class DownloadError(DataError):
    """A download failed, or its checksum did not match."""


class ModelError(MeddiagError):
    """An unknown model, or a checkpoint that cannot be used."""


class ConfigError(MeddiagError):
    """A configuration value or file is invalid."""
