"""Writing DICOM results where they go: a folder (``predict --dicom-out``), and — for the PACS paths — an
outbox that keeps every result until a PACS has confirmed it, so nothing is lost when one is down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meddiag.data.collect import Failure
from meddiag.errors import source_failure
from meddiag.pacs.results import ResultMaker


def write_results(predictor: Any, predictions: list[Any], folder: str | Path) -> tuple[int, int, list[Failure]]:
    """The SR and SC of each prediction of a DICOM input into ``folder/<study>/<series>/<sop>.dcm``.
    Returns (results written, predictions of other inputs, failures: the input and why, its results not made)."""
    maker = ResultMaker(predictor)
    written = skipped = 0
    failures: list[Failure] = []
    for prediction in predictions:
        try:
            result = maker.make(prediction)
        except Exception as exc:  # noqa: BLE001 - one input's result failing never costs the others theirs
            failures.append(Failure(prediction.path, f"no DICOM result: {source_failure(exc, prediction.path)}"))
            continue
        if result is None:
            skipped += 1
            continue
        result.write(folder)
        written += 1
    return written, skipped, failures
