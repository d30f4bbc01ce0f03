"""Exporting a run's model for deployment (ONNX), and finding an up-to-date export to serve."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from torch import nn

from meddiag.errors import ModelError
from meddiag.runfolder import RunFolder, model_checkpoint
from meddiag.models.checkpoint import ModelCard, load_checkpoint
from meddiag.models.onnx import WEIGHTS_KEY, OnnxModel, check_export, export_onnx, weights_fingerprint

log = logging.getLogger("meddiag")
FORMATS = ("onnx",)


def default_export_path(checkpoint: Path) -> Path:
    """``RUN/export/model.onnx`` for a run's checkpoint, else the checkpoint's name with ``.onnx``."""
    folder = RunFolder.of(checkpoint)
    if checkpoint == folder.model_checkpoint:
        return folder.export_onnx
    return checkpoint.with_suffix(".onnx")


def export_run(run: str | Path, out: str | Path | None = None, fmt: str = "onnx") -> tuple[Path, float]:
    """Export the model of ``run`` (a run folder or a checkpoint file) to ``out`` (default
    ``RUN/export/model.onnx``), the model card beside it as ``.json``. Returns the file and the
    largest logit difference between ONNX Runtime and PyTorch found by the parity check."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown export format '{fmt}': choose {', '.join(FORMATS)}")
    run = Path(run)
    checkpoint = model_checkpoint(run)
    model, card = load_checkpoint(checkpoint)
    path = export_onnx(model, card, Path(out) if out else default_export_path(checkpoint), check=False)
    return path, check_export(model, card, path)


def onnx_network(checkpoint: Path, model: nn.Module, card: ModelCard) -> OnnxModel:
    """ONNX Runtime running ``model``: the run's export when it holds these weights, else a fresh
    export written to :func:`default_export_path` first (the card itself always comes from the
    checkpoint, so thresholds and temperatures changed since the export still apply)."""
    path = default_export_path(Path(checkpoint))
    fingerprint = weights_fingerprint(model)
    if path.is_file():
        network = OnnxModel(path)
        if network.metadata.get(WEIGHTS_KEY) == fingerprint:
            return network
        log.info("%s was exported from other weights: exporting again", path)
    else:
        log.info("exporting the model to %s", path)
    try:
        export_onnx(model, card, path)
    except OSError as exc:  # a read-only run folder: export to a private temporary folder instead
        path = Path(tempfile.mkdtemp(prefix="meddiag-onnx-")) / "model.onnx"
        log.info("cannot write the export beside the checkpoint (%s): using %s", exc.strerror or exc, path)
        export_onnx(model, card, path)
    return OnnxModel(path)
