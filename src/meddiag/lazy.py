"""Package names imported on first use (PEP 562), so that importing one module of a stage (the predictor's
metrics, say) does not import all of it (training imports Lightning)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package`` giving each name of ``exports`` (name -> module) when first asked."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
