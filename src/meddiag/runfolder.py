"""The layout of a run folder, in one place: every stage that writes or reads a run's files asks here.

::

    RUN/
      config.yaml            the resolved training configuration (``train --config`` of it reproduces the run)
      data.json              the data as used: source, classes, split sizes, excluded files
      splits/<split>.csv     the file of each image in each split (file sources)
      checkpoints/best.ckpt  the model: weights and model card, all that predicting needs
      checkpoints/last.ckpt  the full training state for ``--resume`` (every epoch; removed when training ends)
      init_weights.json      (runs from initial weights) the load report: what was loaded, adapted, missing
      weights.pt             (``meddiag pretrain`` folders) the pretrained network's weights, for --init-weights
      training.json          written when training has finished: epochs, seconds, validation AUC
      history.csv            per-epoch losses and validation metrics
      predictions.csv, metrics.json, report.html, report.json, plots/   the test evaluation
      fusion.json            (models with covariates) did the patient data help: the report's fusion section
      ood.json               test inputs the out-of-distribution rule flags, and the metrics without them
      predictions_val.csv    validation predictions (operating points are chosen on them)
      eval-<split>/          other evaluations, each with the evaluation files above
      sanity.json, ensemble.json, export/model.onnx, explanations/

Every file is written whole or not at all (:func:`write_text_atomic`): a run killed mid-write leaves
the previous version, never half a file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from meddiag.errors import MeddiagError

# files of an evaluation (in the run folder for its own test split, else in RUN/eval-*)
PREDICTIONS = "predictions.csv"
METRICS = "metrics.json"
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
PLOTS = "plots"
OOD = "ood.json"  # models with an OOD rule: test inputs flagged, metrics without them
FUSION = "fusion.json"  # models with covariates: fused vs image only vs covariates only, robustness, importance


class RunFolder:
    """Paths of one run folder (``RunFolder("runs/x").model_checkpoint``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, path: str | Path) -> RunFolder:
        """The run folder of a run folder, or of a checkpoint file inside one (``RUN/checkpoints/x.ckpt``)."""
        path = Path(path)
        return cls(path.parent.parent if path.is_file() else path)

    config = property(lambda self: self.root / "config.yaml")
    data_record = property(lambda self: self.root / "data.json")
    splits = property(lambda self: self.root / "splits")
    checkpoints = property(lambda self: self.root / "checkpoints")
    model_checkpoint = property(lambda self: self.checkpoints / "best.ckpt")
    resume_checkpoint = property(lambda self: self.checkpoints / "last.ckpt")
    init_weights = property(lambda self: self.root / "init_weights.json")  # the load report of --init-weights/--pretrained
    pretrained_weights = property(lambda self: self.root / "weights.pt")  # what ``meddiag pretrain`` makes
    training_record = property(lambda self: self.root / "training.json")  # written when training has finished
    history = property(lambda self: self.root / "history.csv")
    val_predictions = property(lambda self: self.root / "predictions_val.csv")
    training_curves = property(lambda self: self.root / PLOTS / "training_curves.png")
    example_heatmaps = property(lambda self: self.root / PLOTS / "example_heatmaps.png")  # made after training
    sanity = property(lambda self: self.root / "sanity.json")
    ensemble = property(lambda self: self.root / "ensemble.json")
    export_onnx = property(lambda self: self.root / "export" / "model.onnx")
    explanations = property(lambda self: self.root / "explanations")

    def is_run(self) -> bool:
        return self.checkpoints.is_dir()

    def evaluation_dir(self, split: str, data_tag: str = "") -> Path:
        """Where an evaluation goes: the run folder itself for its own test split, else ``eval[-<data>]-<split>``."""
        return self.root if (split == "test" and not data_tag) else self.root / f"eval{'-' + data_tag if data_tag else ''}-{split}"


def model_checkpoint(path: str | Path) -> Path:
    """A run folder's model checkpoint (``checkpoints/best.ckpt``), or ``path`` itself if it is a
    checkpoint file; :class:`MeddiagError` saying what is missing otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise MeddiagError(f"run folder {path} does not exist")
    checkpoint = RunFolder(path).model_checkpoint
    if not checkpoint.exists():
        raise MeddiagError(f"{path} has no checkpoints/best.ckpt: is it a meddiag run folder, and did training finish an epoch?")
    return checkpoint


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it, flushed to
    disk, then renamed over it (a rename within a folder is atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to any new file
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
