"""The service in front of clinicians: ONNX export, the REST API, its safety rules, micro-batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_meddiag, write_dicom

TOKEN = "test-token-1234"


@pytest.fixture(scope="module")
def run(small_run) -> Path:
    return small_run


@pytest.fixture(scope="module")
def client(run):
    from fastapi.testclient import TestClient

    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    app = create_app(Predictor.from_run(run), run, ServeOptions(token=TOKEN, max_upload_mb=1, max_pixels=4_000_000))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {TOKEN}"
        yield c


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images(run: Path, n: int = 4) -> list[Path]:
    return sorted((run.parent / "images" / "pneumonia").glob("*.png"))[:n // 2] + \
        sorted((run.parent / "images" / "normal").glob("*.png"))[:n // 2]


test_images.__test__ = False  # a helper, not a test


# ---------------------------------------------------------------- ONNX

def test_export_is_one_file_with_a_dynamic_batch_that_agrees_with_pytorch(run, tmp_path):
    from meddiag.models import load_checkpoint
    from meddiag.models.onnx import load_onnx
    from meddiag.serving.export import export_run

    path, difference = export_run(run, tmp_path / "m.onnx")
    assert difference <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]  # no external weight file
    model, card = load_checkpoint(run / "checkpoints" / "best.ckpt")
    onnx_model, onnx_card = load_onnx(path)
    assert onnx_card == card and json.loads((tmp_path / "m.json").read_text())["class_names"] == card.class_names
    images = np.stack([np.asarray(Image.open(p).convert("L").resize((32, 32)))[None] for p in test_images(run, 6)])
    x = (torch.from_numpy(images).float() / 255 - card.mean) / card.std
    with torch.inference_mode():
        expected = model(x)
    for batch in (1, 6):  # dynamic batch dimension
        assert torch.allclose(onnx_model(x[:batch]), expected[:batch], atol=1e-4)


def test_predict_with_the_onnx_backend_matches_torch_and_reexports_when_weights_change(run, tmp_path):
    from meddiag.models.checkpoint import load_checkpoint, save_checkpoint
    from meddiag.models.onnx import WEIGHTS_KEY, OnnxModel
    from meddiag.serving.predictor import Predictor

    files = test_images(run)
    torch_rows, _ = Predictor.from_run(run).predict(files)
    onnx_predictor = Predictor.from_run(run, backend="onnx")
    assert onnx_predictor.network.gives_features  # the export has the penultimate features too, for the OOD score

    class NoTorch(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("the ONNX backend ran the PyTorch network")

    onnx_predictor.model = onnx_predictor.with_features = NoTorch()  # one ONNX Runtime pass gives logits and OOD score
    onnx_rows, failures = onnx_predictor.predict(files)
    assert not failures and (run / "export" / "model.onnx").is_file()
    for a, b in zip(torch_rows, onnx_rows):
        assert a.predicted == b.predicted and a.ood == b.ood
        assert all(abs(a.probabilities[k] - b.probabilities[k]) < 1e-4 for k in a.probabilities)
        assert b.ood_score == pytest.approx(a.ood_score, rel=1e-3, abs=1e-3)
    # a checkpoint with other weights must not be served by the old export
    model, card = load_checkpoint(run / "checkpoints" / "best.ckpt")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "best.ckpt", model, card)
    stale = OnnxModel(run / "export" / "model.onnx").metadata[WEIGHTS_KEY]
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.onnx").write_bytes((run / "export" / "model.onnx").read_bytes())
    fresh = Predictor(ckpt, backend="onnx")
    assert fresh.network.metadata[WEIGHTS_KEY] != stale
    again = fresh.predict(files)[0]
    reference = Predictor(ckpt).predict(files)[0]
    assert all(abs(a.probabilities[k] - b.probabilities[k]) < 1e-4 for a, b in zip(again, reference) for k in a.probabilities)


def test_the_weights_fingerprint_covers_every_tensor_including_batchnorm_counters():
    from meddiag.models import create_model
    from meddiag.models.onnx import weights_fingerprint

    model = create_model("resnet18", 1, 2, 2, 28)
    before = weights_fingerprint(model)
    assert weights_fingerprint(create_model("resnet18", 1, 2, 2, 28)) != before  # other random weights
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean[0] += 1
    assert weights_fingerprint(model) != before


def test_export_and_predict_command_lines(run, tmp_path):
    env = {"MEDDIAG_DATA": "/nonexistent"}
    out = tmp_path / "model.onnx"
    proc = run_meddiag("export", str(run), "--out", str(out), env=env)
    assert proc.returncode == 0 and out.is_file() and str(out) in proc.stdout, proc.stderr
    proc = run_meddiag("export", str(run), "--format", "tflite", env=env)
    assert proc.returncode == 2 and "unknown export format 'tflite'" in proc.stderr
    image = test_images(run, 2)[0]
    rows = [run_meddiag("predict", str(run), str(image), "--backend", backend, env=env) for backend in ("torch", "onnx")]
    assert all(r.returncode == 0 for r in rows), rows[1].stderr
    torch_row, onnx_row = (r.stdout.splitlines()[1].split(",") for r in rows)
    assert torch_row[:2] == onnx_row[:2] and abs(float(torch_row[2]) - float(onnx_row[2])) < 1e-4


# ---------------------------------------------------------------- REST API

def test_health_readiness_and_the_model_card(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    card = client.get("/v1/model").json()
    assert card["classes"] == ["normal", "pneumonia"] and card["task"] == "binary"
    assert card["input"]["size"] == 32 and card["decision"]["threshold"] == 0.5
    assert card["training_data"]["splits"]["train"]["n_images"] > 0 and card["training_data"]["name"] == "images"
    metrics = card["test_metrics"]
    lo, hi = metrics["auc_ci"]
    assert lo <= metrics["auc"] <= hi and metrics["n_images"] == 16
    point = metrics["at_threshold"]["pneumonia"]
    assert {"sensitivity", "specificity", "sensitivity_ci", "specificity_ci"} <= set(point)
    assert card["meddiag_version"]


def test_predictions_match_the_library_and_explanations_come_as_pngs(client, run):
    from meddiag.serving.predictor import Predictor

    files = test_images(run)
    expected, _ = Predictor.from_run(run).predict(files)
    response = client.post("/v1/predict?explain=gradcam",
                           files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(len(files)))
    assert [r["file"] for r in results] == [f.name for f in files]
    for r, e in zip(results, expected):
        assert r["prediction"] == e.predicted
        assert all(abs(r["probabilities"][k] - e.probabilities[k]) < 1e-5 for k in e.probabilities)
        assert 0 <= r["uncertainty"] <= 1
        heat = Image.open(io.BytesIO(base64.b64decode(r["heatmap_png"])))
        original = Image.open(io.BytesIO(base64.b64decode(r["image_png"])))
        assert heat.size == original.size == (40, 40) and heat.mode == "RGB"
        assert r["heatmap"]["class"] == r["prediction"]


def test_dicom_uploads_are_read_without_returning_or_logging_patient_data(client, caplog):
    pixels = (np.random.default_rng(0).random((64, 64)) * 4000).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dicom(Path(tmp) / "x.dcm", pixels, PatientName="DOE^JANE", PatientID="MRN-998877",
                           PatientBirthDate="19700101")
        data = path.read_bytes()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/predict?explain=gradcam", files=[("files", ("scan", data, "application/dicom"))])
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["sop_instance_uid"] and "heatmap_png" in result
    for secret in ("DOE", "JANE", "MRN-998877", "19700101"):
        assert secret not in response.text
        assert secret not in caplog.text
    assert "scan" not in caplog.text  # file names are never logged


def test_a_bearer_token_guards_every_api_route(client):
    png = png_bytes(np.zeros((20, 20), np.uint8))
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        assert client.get("/v1/model", headers=headers).status_code == 401
        r = client.post("/v1/predict", files=[("files", ("a.png", png, "image/png"))], headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_oversized_requests_get_413_whether_declared_or_streamed(client):
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(2 * 1024 * 1024)
    r = client.post("/v1/predict", files=[("files", ("big.png", big, "image/png"))])
    assert r.status_code == 413 and "upload limit of 1 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold while the body streams
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n"
        for _ in range(40):
            yield os.urandom(64 * 1024)

    r = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("name, data, status, message", [
    ("notes.txt", b"patient says hello\n" * 20, 415, "not a PNG, JPEG"),
    ("empty.png", b"", 400, "empty"),
    ("cut.png", png_bytes(np.full((50, 50), 7, np.uint8))[:60], 400, "corrupt or truncated"),
    ("bomb.png", _png_header_only(10_000, 10_000), 400, "100,000,000 pixels"),
])
def test_bad_uploads_get_a_clear_4xx_naming_the_file(client, name, data, status, message):
    r = client.post("/v1/predict", files=[("files", ("ok.png", png_bytes(np.zeros((20, 20), np.uint8)), "image/png")),
                                          ("files", (name, data, "application/octet-stream"))])
    assert r.status_code == status, r.text
    body = r.json()
    assert body["index"] == 1 and body["file"] == name and message in body["reason"]


def test_decompression_bombs_in_dicom_and_nifti_are_refused_before_decoding(client, run, tmp_path):
    import gzip

    import nibabel as nib

    bomb = write_dicom(tmp_path / "bomb.dcm", np.zeros((4, 4), np.uint8))
    import pydicom

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(bomb)
    ds.Rows, ds.Columns = 60_000, 60_000  # a compressed frame of a few bytes declaring 3.6 gigapixels
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    ds.save_as(bomb)
    r = client.post("/v1/predict", files=[("files", ("bomb.dcm", bomb.read_bytes(), "application/dicom"))])
    assert r.status_code == 400 and "3,600,000,000 pixels" in r.json()["reason"]
    # uncompressed, the same header is a lie about the file's own size: refused as such, before decoding
    liar = write_dicom(tmp_path / "liar.dcm", np.zeros((4, 4), np.uint8))
    ds = pydicom.dcmread(liar)
    ds.Rows, ds.Columns = 60_000, 60_000
    ds.save_as(liar)
    r = client.post("/v1/predict", files=[("files", ("liar.dcm", liar.read_bytes(), "application/dicom"))])
    assert r.status_code == 400 and "header and data disagree" in r.json()["reason"], r.json()
    # a 2D model is told that a NIfTI volume is the wrong kind of input
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    blob = gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 1000)
    r = client.post("/v1/predict", files=[("files", ("v.nii.gz", blob, "application/gzip"))])
    assert r.status_code == 415 and "this model diagnoses 2D images" in r.json()["reason"]
    # ... and for a 3D model the header alone is enough to refuse it
    from meddiag.data.limits import check_pixels
    from meddiag.errors import ImageReadError

    (tmp_path / "v.nii.gz").write_bytes(blob)
    with pytest.raises(ImageReadError, match="8,000,000,000 pixels"):
        check_pixels(tmp_path / "v.nii.gz", 100_000_000)


def test_client_file_names_are_never_used_as_paths(client, tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("meddiag-upload-*"))
    target = tmp_path / "planted.png"
    name = "../" * 12 + str(target).lstrip("/")
    r = client.post("/v1/predict", files=[("files", (name, png_bytes(np.zeros((20, 20), np.uint8)), "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["file"] == "planted.png"
    assert not target.exists()
    assert set(Path(tempfile.gettempdir()).glob("meddiag-upload-*")) == before  # uploads deleted at once


def test_the_docs_work_offline(client):
    page = client.get("/docs").text
    assert "http://" not in page and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"./static/{asset}" in page and client.get(f"/static/{asset}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())
    index = client.get("/").text
    assert "<script" in index and "https://" not in index and "http://" not in index


# ---------------------------------------------------------------- micro-batching

def test_micro_batching_joins_concurrent_requests_and_returns_each_its_rows():
    from meddiag.serving.batching import MicroBatcher

    seen: list[int] = []

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        seen.append(len(x))
        return {"double": x * 2, "sum": x.reshape(len(x), -1).sum(1)}

    async def main() -> list[dict]:
        batcher = MicroBatcher(model, max_batch=16, max_wait=0.05)
        requests = [np.full((1 + i % 3, 2), i, np.float32) for i in range(8)]
        out = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return requests, out

    requests, out = asyncio.run(main())
    assert sum(seen) == sum(len(r) for r in requests) and max(seen) > 3 and len(seen) < 8
    for r, o in zip(requests, out):
        assert np.array_equal(o["double"], r * 2) and o["sum"].shape == (len(r),)


def test_micro_batching_passes_model_errors_to_the_requests_and_keeps_serving():
    from meddiag.serving.batching import MicroBatcher

    def model(x: np.ndarray) -> dict[str, np.ndarray]:
        if (x < 0).any():
            raise RuntimeError("bad batch")
        return {"y": x}

    async def main() -> None:
        batcher = MicroBatcher(model, max_batch=4, max_wait=0.0)
        with pytest.raises(RuntimeError, match="bad batch"):
            await batcher.submit(-np.ones((1, 1)))
        assert (await batcher.submit(np.ones((2, 1))))["y"].shape == (2, 1)
        await batcher.close()

    asyncio.run(main())


def test_a_3d_model_takes_nifti_volumes_and_refuses_2d_images(tmp_path):
    import nibabel as nib
    from fastapi.testclient import TestClient

    from meddiag.models.checkpoint import ModelCard, save_checkpoint
    from meddiag.serving.app import create_app
    from meddiag.serving.predictor import Predictor

    card = ModelCard(model_name="seed_cnn", class_names=["benign", "malignant"], task="binary", image_size=24,
                     in_channels=1, spatial_dims=3)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "checkpoints" / "best.ckpt", card.build_model(), card)
    volume = np.random.default_rng(0).normal(0, 100, (30, 30, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), tmp_path / "v.nii.gz")
    predictor = Predictor(checkpoint)
    expected = predictor.predict([tmp_path / "v.nii.gz"])[0][0]
    with TestClient(create_app(predictor)) as client:
        r = client.post("/v1/predict?explain=gradcam", files=[("files", ("v.nii.gz", (tmp_path / "v.nii.gz").read_bytes(), "application/gzip"))])
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert abs(result["probabilities"]["malignant"] - expected.probabilities["malignant"]) < 1e-5
        assert "image_png" not in result and Image.open(io.BytesIO(base64.b64decode(result["heatmap_png"]))).width > 300
        r = client.post("/v1/predict", files=[("files", ("x.png", png_bytes(np.zeros((30, 30), np.uint8)), "image/png"))])
        assert r.status_code == 415 and "this model diagnoses volumes" in r.json()["reason"]
        assert client.get("/v1/model").json()["test_metrics"] is None  # a bare checkpoint: no run folder
