"""Hostile input: a generated corpus of malformed and unusual files (see ``hostile.py``) through every
path that reads files. One bad file must never cost the others: each is diagnosed or named with a
reason, no traceback, no 5xx, no diagnosis from NaN pixels, the process alive and its memory bounded."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_image_folder, write_dicom
from hostile import make_corpus
from test_end_to_end import meddiag, no_traceback

REFUSED = ("bad", "nonfinite", "volume")  # by a 2D model


# Runs the command in a process of its own and writes its peak resident memory (kB) to argv[1]. A go-between,
# because Linux counts a child's peak from the memory of the process it was forked from (``ru_maxrss`` keeps
# the parent's across exec), and the test process may be large by then: this small one is forked instead.
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "meddiag", *sys.argv[2:]])
_, status, usage = os.wait4(child.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def measured(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m meddiag ARGS`` in a process of its own, and that process's peak memory in MB (its own and its
    children's; neither this test process's nor its earlier children's, as ``RUSAGE_CHILDREN`` here would give)."""
    with tempfile.TemporaryDirectory() as folder:
        peak = Path(folder) / "peak_kb"
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(peak), *args], capture_output=True, text=True,
                              env={**os.environ, "MEDDIAG_DATA": "/nonexistent"}, timeout=600)
        return done, int(peak.read_text()) / 1024


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[Path, str]:
    return make_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def test_the_corpus_is_large_and_covers_every_outcome(corpus):
    kinds = list(corpus.values())
    assert len(corpus) >= 90 and {"bad", "nonfinite", "valid", "bad_or_valid"} <= set(kinds)


def test_reading_any_file_gives_an_image_or_a_named_reason_never_another_exception(corpus):
    from meddiag.data.images import read_image_file
    from meddiag.errors import ImageReadError

    for path, kind in corpus.items():
        try:
            arr, _ = read_image_file(path)
        except ImageReadError as exc:
            assert exc.path == str(path) and exc.reason and "\n" not in exc.reason, (path, exc.reason)
            assert kind != "valid", (path, exc.reason)
            if kind == "nonfinite":
                assert "NaN or infinite" in exc.reason, (path, exc.reason)
            continue
        assert kind not in REFUSED, f"{path.name} ({kind}) was read"
        assert arr.dtype == np.uint8 and arr.size > 0


def test_predict_diagnoses_every_good_file_and_names_every_bad_one(corpus, small_run):
    folder = next(iter(corpus)).parent
    proc, peak_mb = measured("predict", str(small_run), str(folder))
    assert proc.returncode == 1 and no_traceback(proc), proc.stderr[-3000:]
    predicted = {row["path"] for row in csv.DictReader(io.StringIO(proc.stdout))}
    named = {line.split(": ", 2)[1] for line in proc.stderr.splitlines() if line.startswith("error: ")}
    for path, kind in corpus.items():
        assert (str(path) in predicted) != (str(path) in named), f"{path.name}: predicted and named, or neither"
        if kind in REFUSED:
            assert str(path) in named, f"{path.name} ({kind}) was diagnosed"
        if kind == "valid":
            assert str(path) in predicted, f"{path.name} was refused"
    assert peak_mb < 3000, f"predict peaked at {peak_mb:.0f} MB"


def test_serve_answers_4xx_for_every_bad_upload_and_200_for_every_good_one(corpus, small_run):
    from fastapi.testclient import TestClient

    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    app = create_app(Predictor.from_run(small_run), small_run, ServeOptions(max_upload_mb=5, max_pixels=50_000_000))
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, kind in corpus.items():
            r = client.post("/v1/predict", files=[("files", (path.name, path.read_bytes(), "application/octet-stream"))])
            assert r.status_code in (200, 400, 413, 415), (path.name, r.status_code, r.text[:300])
            if kind in REFUSED:
                assert r.status_code != 200, f"{path.name} ({kind}) was diagnosed: {r.text[:200]}"
                assert r.json()["reason"], path.name
            if kind == "valid":
                assert r.status_code == 200, (path.name, r.text[:300])
            if r.status_code == 200:
                assert all(np.isfinite(v) for v in r.json()["results"][0]["probabilities"].values())
        assert client.get("/healthz").status_code == 200  # still alive


def test_training_excludes_each_bad_file_by_name_and_trains_on_the_rest(corpus, tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=20)
    for path in corpus:
        shutil.copy(path, data / "normal" / path.name)
    run = tmp_path / "run"
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "1", "--image-size", "24", "--out", str(run), "--no-progress")
    assert proc.returncode == 0 and no_traceback(proc), proc.stderr[-3000:]
    record = json.loads((run / "data.json").read_text())
    excluded = {Path(e["path"]).name: e["reason"] for e in record["excluded"]}
    used = set()
    for split in ("train", "val", "test"):
        with open(run / "splits" / f"{split}.csv") as fh:
            used |= {Path(r["path"]).name for r in csv.DictReader(fh)}
    for path, kind in corpus.items():
        assert (path.name in excluded) != (path.name in used), path.name
        if kind in REFUSED:
            assert path.name in excluded, f"{path.name} ({kind}) was trained on"
        if kind == "valid":
            assert path.name in used, (path.name, excluded.get(path.name))


def test_inspect_lists_every_unreadable_file(corpus):
    folder = next(iter(corpus)).parent
    root = folder.parent / "inspect-me"
    if not root.exists():
        (root / "a").mkdir(parents=True)
        for path in corpus:
            shutil.copy(path, root / "a" / path.name)
        make_image_folder(root, per_class=3, classes=("b",))
    proc = meddiag("inspect", str(root), "--json", str(root.parent / "inspect.json"))
    assert proc.returncode == 0 and no_traceback(proc), proc.stderr[-2000:]
    report = json.loads((root.parent / "inspect.json").read_text())
    unreadable = {Path(u["path"]).name for u in report["unreadable"]}
    assert any("volumes" in w for w in report["warnings"])  # the one NIfTI volume among 2D images
    for path, kind in corpus.items():
        if kind in ("bad", "nonfinite"):
            assert path.name in unreadable, path.name
        if kind in ("valid", "volume"):
            assert path.name not in unreadable, path.name


_VALID: dict[str, bytes] = {}


def _valid_files(tmp: Path) -> dict[str, bytes]:
    """The same two small valid files on every call (hypothesis replays draws against them)."""
    if _VALID:
        return _VALID
    from PIL import Image

    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray((rng.random((24, 24)) * 255).astype(np.uint8)).save(buf, "PNG")
    dcm = write_dicom(tmp / "seed.dcm", (rng.random((16, 16)) * 1000).astype(np.uint16), RescaleSlope=1, RescaleIntercept=0)
    _VALID.update({".png": buf.getvalue(), ".dcm": dcm.read_bytes()})
    return _VALID


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_of_a_valid_file_reads_or_fails_with_a_named_reason(tmp_path, data):
    from meddiag.data.images import read_image_file
    from meddiag.errors import ImageReadError

    files = _valid_files(tmp_path)
    suffix = data.draw(st.sampled_from(sorted(files)))
    original = bytearray(files[suffix])
    how = data.draw(st.sampled_from(["flip", "truncate", "overwrite"]))
    if how == "truncate":
        original = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 12))):
            at = data.draw(st.integers(0, len(original) - 1))
            original[at] = data.draw(st.integers(0, 255)) if how == "overwrite" else original[at] ^ 0xFF
    path = tmp_path / f"mutated{suffix}"
    path.write_bytes(bytes(original))
    try:
        arr, _ = read_image_file(path)
    except ImageReadError as exc:
        assert exc.reason and exc.path == str(path)
    else:
        assert arr.dtype == np.uint8 and arr.size > 0


def test_a_3d_model_names_every_file_it_cannot_diagnose_and_diagnoses_the_volume(corpus, tmp_path):
    from fastapi.testclient import TestClient

    from meddiag.models.checkpoint import ModelCard, save_checkpoint
    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    card = ModelCard(model_name="seed_cnn", class_names=["normal", "lesion"], task="binary", image_size=24,
                     in_channels=1, spatial_dims=3, model_kwargs={"widths": [4, 8, 8], "dense": 8})
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", card.build_model(), card)
    predictor = Predictor(checkpoint)
    # each file given by name (a folder of single-frame DICOM files would be read as one series)
    predictions, failures = predictor.predict(list(corpus))
    predicted, named = {p.path for p in predictions}, {f.path for f in failures}
    volume = next(p for p, k in corpus.items() if k == "volume")
    assert predicted == {str(volume)}, predicted
    assert named == {str(p) for p in corpus if p != volume}
    assert all(f.reason for f in failures)
    assert next(f for f in failures if f.path.endswith("nan_volume.nii")).reason.count("NaN or infinite") == 1
    # given as a folder, its single-frame DICOM files are one series, refused for its bad slices (named);
    # the NIfTI volume beside them is still diagnosed on its own
    predictions, failures = predictor.predict([volume.parent])
    assert [p.path for p in predictions] == [str(volume)]
    series = next(f for f in failures if f.path == str(volume.parent))
    assert series.reason.split(": ")[0].endswith(".dcm") or "no DICOM" in series.reason, series.reason
    with TestClient(create_app(predictor, None, ServeOptions()), raise_server_exceptions=False) as client:
        for path, kind in corpus.items():
            r = client.post("/v1/predict", files=[("files", (path.name, path.read_bytes(), "application/octet-stream"))])
            assert r.status_code in ((200,) if path == volume else (400, 413, 415)), (path.name, r.status_code, r.text[:200])
