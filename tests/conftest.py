"""Shared fixtures: synthetic image folders the tests make themselves, and the real shared data."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
import traceback
import warnings
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MEDMNIST_DIR = SHARED_DATA / "medmnist"


def synthetic_image(label: int, rng: np.random.Generator, size: int = 40, rgb: bool = False) -> np.ndarray:
    """A noisy image with a bright blob on the left (class 0) or the right (class 1)."""
    img = rng.normal(60, 15, (size, size))
    yy, xx = np.mgrid[:size, :size]
    cx = size * (0.3 if label == 0 else 0.7) + rng.normal(0, 1.5)
    cy = size * 0.5 + rng.normal(0, 3)
    img += 150 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 10) ** 2))
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rgb:
        return np.stack([img, img, img], axis=-1)
    return img


def make_image_folder(root: Path, per_class: int = 30, classes: tuple[str, ...] = ("normal", "pneumonia"),
                      splits: tuple[str, ...] | None = None, seed: int = 0, ext: str = ".png") -> Path:
    """ROOT/CLASS/*.png, or ROOT/SPLIT/CLASS/*.png when ``splits`` is given."""
    rng = np.random.default_rng(seed)
    for split in splits or (None,):
        base = root / split if split else root
        for label, name in enumerate(classes):
            (base / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(synthetic_image(label % 2, rng)).save(base / name / f"img{i:03d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def shared_medmnist(monkeypatch: pytest.MonkeyPatch) -> Path:
    if not (MEDMNIST_DIR / "pneumoniamnist.npz").exists():
        pytest.skip(f"shared data not found at {MEDMNIST_DIR}")
    monkeypatch.setenv("MEDDIAG_DATA", str(MEDMNIST_DIR))
    return MEDMNIST_DIR


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The prepared-image and weights caches of the tests live in a folder of their own, never the user's ~/.cache.
    os.environ["MEDDIAG_CACHE"] = str(tmp_path_factory.mktemp("meddiag-cache"))


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    # Tests train tiny models; keep them from oversubscribing a 2-core machine.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_meddiag(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``meddiag ARGS`` through the command line's own entry (the ``app`` that ``python -m meddiag`` and the
    ``meddiag`` script call), in this process: what a test sees is what a new process would print and return
    (stdout, stderr with meddiag's warnings and errors, a traceback for an uncaught exception, the exit code),
    without the seconds each new process spends importing torch, Lightning and MONAI. ``env`` and ``cwd`` hold
    for the call only; warnings, logging, torch's thread count and the working directory are put back after it.
    Tests whose subject is the process itself (killed and resumed runs, servers, several processes, ``python -m``)
    start real processes instead."""
    import lightning.pytorch  # noqa: F401  (imported now, its log handler holds this process's stderr: moved below)
    import torch

    from meddiag.cli import app

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_logging = {name: (logger.level, list(logger.handlers)) for name, logger in
                     [("", logging.root), *logging.root.manager.loggerDict.items()] if isinstance(logger, logging.Logger)}
    # Logging handlers made earlier (Lightning's) hold the stream they were made with: point them at this call's.
    moved = [(handler, handler.stream) for _, handlers in saved_logging.values() for handler in handlers
             if type(handler) is logging.StreamHandler and handler.stream in (sys.stdout, sys.stderr)]
    code = 0
    try:
        for handler, stream in moved:
            handler.setStream(out if stream is sys.stdout else err)
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            # A new interpreter's warning filters, shown on (this call's) stderr rather than recorded by pytest.
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            try:
                app(args=[str(a) for a in args], prog_name="meddiag")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # what Python prints and returns when a command raises
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        torch.set_num_threads(threads)
        for handler, stream in moved:
            handler.setStream(stream)
        for name, (level, handlers) in saved_logging.items():
            logger = logging.getLogger(name or None)
            logger.setLevel(level)
            logger.handlers[:] = handlers
    return subprocess.CompletedProcess(["meddiag", *map(str, args)], code, out.getvalue(), err.getvalue())


def write_dicom(path: Path, pixels: np.ndarray, **attributes: object) -> Path:
    """A minimal valid DICOM file (explicit VR little endian) holding ``pixels`` (uint16/int16 or uint8),
    (rows, columns) or, multi-frame, (frames, rows, columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """A CSV (e.g. a manifest) with the keys of the first row as its header."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def small_run(tmp_path_factory) -> Path:
    """A small trained run (seed_cnn, 32 px, report included) on a synthetic two-class folder
    (``<run>/../images``), shared by the serving and web page tests."""
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    base = tmp_path_factory.mktemp("small-run")
    data = make_image_folder(base / "images", per_class=40)
    config = TrainConfig(data=str(data), model="seed_cnn", epochs=12, image_size=32, batch_size=8, out=str(base / "run"))
    result = train_and_evaluate(config, progress=False)
    assert result.test_metrics["auc"] > 0.9, result.test_metrics
    return base / "run"


def make_covariate_manifest(root: Path, n: int = 200, seed: int = 0, size: int = 24) -> Path:
    """A two-class manifest whose label the image and the patient's age both carry, each only in part:
    ``path,label,patient_id,age,sex,site`` with missing values (age blank or 'NA' in ~10% of rows, sex
    'unknown' in ~10%, site blank in ~10%). Age > 55 goes with disease 85% of the time; the image's blob
    side with it 75% of the time, independently."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = int(rng.random() < 0.5)
        old = rng.random() < (0.85 if label else 0.15)
        age = rng.uniform(56, 90) if old else rng.uniform(20, 54)
        side = label if rng.random() < 0.75 else 1 - label
        path = root / "img" / f"case{i:03d}.png"
        Image.fromarray(synthetic_image(side, rng, size)).save(path)
        age_text = "" if rng.random() < 0.05 else ("NA" if rng.random() < 0.05 else f"{age:.0f}")
        sex = "unknown" if rng.random() < 0.1 else ("female" if rng.random() < 0.5 else "male")
        site = "" if rng.random() < 0.1 else ("north" if rng.random() < 0.5 else "south")
        rows.append({"path": f"img/{path.name}", "label": "disease" if label else "normal", "patient_id": f"P{i:03d}",
                     "age": age_text, "sex": sex, "site": site})
    return write_csv(root / "manifest.csv", rows)


@pytest.fixture(scope="session")
def fused_run(tmp_path_factory) -> Path:
    """A seed_cnn fused with age, sex and site (late fusion) on :func:`make_covariate_manifest` data,
    trained and evaluated (report with its fusion section); the manifest is ``<run>/../manifest.csv``."""
    from meddiag.training.config import TrainConfig
    from meddiag.workflow import train_and_evaluate

    base = tmp_path_factory.mktemp("fused-run")
    manifest = make_covariate_manifest(base)
    config = TrainConfig(data=str(manifest), model="seed_cnn", epochs=15, image_size=24, batch_size=16, seed=0,
                         covariates=["age", "sex", "site"], out=str(base / "run"), model_kwargs={"widths": [8, 16, 16], "dense": 32})
    train_and_evaluate(config, progress=False)
    return base / "run"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A folder served at http://127.0.0.1:<port>/ for the duration of a test."""
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def make_volume_folder(root: Path, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """ROOT/{benign,malignant}/*.nii.gz: noisy volumes with a bright cube in one half (by class)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for label, name in enumerate(("benign", "malignant")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            vol = rng.normal(0.2, 0.05, (size, size, size)).astype(np.float32)
            start = 2 if label == 0 else size // 2
            vol[start : start + size // 3, 5:12, 5:12] += 0.7
            nib.save(nib.Nifti1Image(vol, np.eye(4)), root / name / f"v{i:02d}.nii.gz")
    return root
