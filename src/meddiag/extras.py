"""Optional dependencies: a command that needs an extra says which one to install, never a traceback."""

from __future__ import annotations

import importlib.util

from meddiag.errors import MeddiagError

# extra -> the import names it provides (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "multipart", "onnx", "onnxruntime", "onnxscript"),
    "tune": ("optuna",),
    "loggers": ("tensorboard", "mlflow"),
    "pacs": ("highdicom", "dicomweb_client", "pynetdicom"),
}


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """:class:`MeddiagError` naming ``pip install 'meddiag[extra]'`` when a module of ``extra`` (or
    just ``modules``) is not installed; ``what`` is the feature that needs it (e.g. 'meddiag tune')."""
    missing = [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]
    if missing:
        raise MeddiagError(f"{what} needs {', '.join(missing)}, which is not installed: pip install 'meddiag[{extra}]'")
