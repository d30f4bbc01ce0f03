"""DICOM results: the Structured Report and the heatmap Secondary Capture of each diagnosis, in the source's
study, referencing the source, validated by highdicom, pydicom and dicom3tools' dciodvfy; the same objects again
when the same image is diagnosed again."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import SHARED_DATA, run_meddiag, synthetic_image, write_dicom

CR = SHARED_DATA / "dicom" / "pydicom_data" / "RG1_UNCR.dcm"  # a real chest CR, 1955 x 1841
DCIODVFY = shutil.which("dciodvfy")


def predict(run: Path, *args: str) -> subprocess.CompletedProcess:
    return run_meddiag("predict", str(run), *args)


def content_items(ds) -> list:  # noqa: ANN001
    """Every content item of an SR, depth first."""
    out = []
    for item in getattr(ds, "ContentSequence", []):
        out.append(item)
        out += content_items(item)
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    assert DCIODVFY, "dciodvfy (Debian's dicom3tools) is not installed: the README's test command installs it"
    done = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def dicom_sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("sources")
    made = write_dicom(root / "synthetic.dcm", synthetic_image(1, np.random.default_rng(4), size=64).astype(np.uint16) * 16,
                       PatientName="Roe^Richard", PatientID="MRN-77", Modality="DX", PatientOrientation=["AL", "F"], StudyDate="20261130",
                       PixelSpacing=[0.2, 0.2], WindowCenter=2048, WindowWidth=4096)
    return [CR, made]


def test_predict_writes_a_valid_sr_and_heatmap_sc_into_the_source_study(small_run, dicom_sources, tmp_path):
    out = tmp_path / "dicom"
    proc = predict(small_run, *map(str, dicom_sources), "--output", str(tmp_path / "p.csv"), "--dicom-out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 4
    for source_path in dicom_sources:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
        mine = [pydicom.dcmread(p) for p in written if p.parts[-3] == source.StudyInstanceUID]
        kinds = {d.SOPClassUID.name: d for d in mine}
        assert set(kinds) == {"Comprehensive 3D SR Storage", "Secondary Capture Image Storage"}
        sr, sc = kinds["Comprehensive 3D SR Storage"], kinds["Secondary Capture Image Storage"]
        for ds in (sr, sc):  # the source's patient and study; a series of its own
            assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
            assert ds.PatientName == source.PatientName and ds.SeriesInstanceUID != source.SeriesInstanceUID
            assert "RESEARCH USE - NOT FOR DIAGNOSIS" in ds.SeriesDescription
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
        items = content_items(sr)
        images = [i for i in items if i.ValueType == "IMAGE"]
        assert images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        row = rows[str(source_path)]
        numbers = {i.ConceptNameCodeSequence[0].CodeMeaning: float(i.MeasuredValueSequence[0].NumericValue)
                   for i in items if i.ValueType == "NUM"}
        for name in ("normal", "pneumonia"):
            assert numbers[f"Probability of {name}"] == pytest.approx(float(row[f"prob_{name}"]), abs=1e-5)
        assert numbers["Certainty of Finding"] == pytest.approx(100 * float(row[f"prob_{row['prediction']}"]), abs=1e-3)
        codes = {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0] for i in items if i.ValueType == "CODE"}
        assert codes["Finding"].CodeMeaning.lower() == row["prediction"].lower()
        assert codes["Input unlike the training data"].CodeMeaning == ("Yes" if row["ood"] == "1" else "No")
        assert any("meddiag" in str(i.get("TextValue", "")) for i in items)  # the algorithm's name (TID 4019)
        # the heatmap at the source's own size and spacing, the result burned in and said so
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns) and sc.SamplesPerPixel == 3
        assert sc.BurnedInAnnotation == "YES" and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        if float(source.get("PixelSpacing", [0])[0] or 0) > 0:
            assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        assert sc.pixel_array.shape == (source.Rows, source.Columns, 3)
    for path in written:
        assert dciodvfy_errors(path) == [], path


def test_the_same_diagnosis_again_makes_the_same_objects_and_non_dicom_inputs_none(small_run, dicom_sources, tmp_path):
    png = sorted((small_run.parent / "images").rglob("*.png"))[0]
    first = predict(small_run, str(dicom_sources[1]), str(png), "--dicom-out", str(tmp_path / "a"))
    again = predict(small_run, str(dicom_sources[1]), "--dicom-out", str(tmp_path / "b"))
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "1 input(s) were not DICOM" in first.stderr
    names = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.dcm"))  # noqa: E731
    assert names(tmp_path / "a") == names(tmp_path / "b") and len(names(tmp_path / "a")) == 2


def test_a_source_that_cannot_be_read_again_costs_its_result_only(small_run, dicom_sources, tmp_path, monkeypatch):
    from meddiag import load
    from meddiag.pacs.store import write_results

    model = load(small_run)
    copies = []
    for k in range(2):
        copies.append(tmp_path / f"s{k}.dcm")
        shutil.copy(dicom_sources[1], copies[-1])
    predictions = model.predict([str(p) for p in copies])
    copies[0].write_bytes(copies[0].read_bytes()[:300])  # damaged after it was diagnosed
    written, skipped, failures = write_results(model.predictor, list(predictions), tmp_path / "out")
    assert written == 1 and skipped == 0 and len(failures) == 1 and "s0.dcm" in failures[0].path


def test_a_series_gets_one_sr_referencing_every_slice(tmp_path):
    """A 3D model's result for a DICOM series folder: the SR references each slice, the SC shows three planes."""
    from meddiag import load, train
    from meddiag.pacs.store import write_results

    from conftest import make_volume_folder

    vols = make_volume_folder(tmp_path / "vols", per_class=6, size=20)
    run = train(vols, model="seed_cnn", epochs=1, image_size=20, batch_size=4, out=tmp_path / "run", ood_keep=None)
    series = tmp_path / "series"
    rng = np.random.default_rng(0)
    from pydicom.uid import generate_uid

    study, uid = generate_uid(), generate_uid()
    for z in range(12):
        write_dicom(series / f"s{z:02d}.dcm", (rng.random((16, 16)) * 1000).astype(np.uint16), StudyInstanceUID=study,
                    SeriesInstanceUID=uid, ImagePositionPatient=[0, 0, 2.0 * z], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    PixelSpacing=[1, 1], SliceThickness=2, InstanceNumber=z + 1, PatientID="MRN-3D")
    model = load(run)
    predictions = model.predict([str(series)])
    written, _, failures = write_results(model.predictor, list(predictions), tmp_path / "out")
    assert written == 1 and not failures
    sr = next(pydicom.dcmread(p) for p in (tmp_path / "out").rglob("*.dcm") if pydicom.dcmread(p).Modality == "SR")
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(sr) if i.ValueType == "IMAGE"}
    assert referenced == {pydicom.dcmread(p).SOPInstanceUID for p in series.iterdir()}
    assert sr.StudyInstanceUID == study
    for path in (tmp_path / "out").rglob("*.dcm"):
        assert dciodvfy_errors(path) == [], path


# -- a real PACS: Orthanc over DICOMweb --------------------------------------------------------------------

def test_pacs_predict_over_dicomweb_stores_sr_and_sc_in_the_study_once(small_run, dicom_sources, tmp_path):
    import io

    from orthanc import PASSWORD, USER, Orthanc

    env = {"MEDDIAG_PACS_USER": USER, "MEDDIAG_PACS_PASSWORD": PASSWORD}
    with Orthanc(tmp_path / "orthanc") as pacs:
        for path in dicom_sources:
            pacs.upload(path)
        study = str(pydicom.dcmread(CR, stop_before_pixels=True).StudyInstanceUID)
        command = ["pacs", "predict", str(small_run), "--url", pacs.dicomweb, "--study", study, "--outbox", str(tmp_path / "outbox")]
        first = run_meddiag(*command, env=env)
        assert first.returncode == 0, first.stderr
        assert "1 series diagnosed, 2 result objects stored" in first.stdout
        held = pacs.instances()
        results = [i for i in held if i["StudyInstanceUID"] == study and i.get("Manufacturer") == "meddiag"]
        assert sorted(i["Modality"] for i in results) == ["OT", "SR"]
        sr = pydicom.dcmread(io.BytesIO(pacs.file(next(i["id"] for i in results if i["Modality"] == "SR"))))
        source = pydicom.dcmread(CR, stop_before_pixels=True)
        refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(sr) if i.ValueType == "IMAGE"}
        assert refs == {source.SOPInstanceUID} and sr.PatientID == source.PatientID
        assert PASSWORD not in first.stdout + first.stderr  # the credentials are never printed
        # a second run finds the results there: nothing diagnosed again, nothing duplicated
        again = run_meddiag(*command, env=env)
        assert again.returncode == 0 and "0 series diagnosed" in again.stdout
        assert "1 series diagnosed before by this model, 2 series of meddiag's own results" in again.stdout
        assert len(pacs.instances()) == len(held)
        # the other study, found by modality and date: meddiag's own results are never diagnosed
        by_date = run_meddiag(*command[:5], "--modality", "DX", "--since", "1900-01-01", "--outbox", str(tmp_path / "outbox"),
                              env=env)
        assert by_date.returncode == 0, by_date.stderr
        assert "1 series diagnosed" in by_date.stdout and len(pacs.instances()) == len(held) + 2
        # wrong credentials: said at once, the password not shown
        wrong = run_meddiag(*command, env={**env, "MEDDIAG_PACS_PASSWORD": "not-it"})
        assert wrong.returncode == 2 and "refused the credentials (HTTP 401)" in wrong.stderr and "not-it" not in wrong.stderr


def test_results_a_pacs_could_not_take_wait_in_the_outbox_and_go_first_next_time(small_run, dicom_sources, tmp_path):
    from orthanc import PASSWORD, USER, Orthanc

    env = {"MEDDIAG_PACS_USER": USER, "MEDDIAG_PACS_PASSWORD": PASSWORD}
    study = str(pydicom.dcmread(dicom_sources[1], stop_before_pixels=True).StudyInstanceUID)
    # results made while no PACS answers: a local folder of the study stands for what was fetched
    from meddiag import load
    from meddiag.pacs.dicomweb import Outbox, PacsRun, _send
    from meddiag.pacs.results import ResultMaker

    model = load(small_run)
    [prediction] = model.predict([str(dicom_sources[1])])
    box = Outbox(tmp_path / "outbox")
    files = [box.put(ds) for ds in ResultMaker(model.predictor).make(prediction).datasets()]

    class Down:
        def store_instances(self, *a, **k):
            import requests
            raise requests.ConnectionError("connection refused")

    report = PacsRun()
    _send(Down(), files, report, attempts=2, echo=lambda _: None)
    assert report.stored == 0 and len(box.waiting()) == 2 and "cannot be reached" in report.problems[0]
    with Orthanc(tmp_path / "orthanc") as pacs:
        pacs.upload(dicom_sources[1])
        done = run_meddiag("pacs", "predict", str(small_run), "--url", pacs.dicomweb, "--study", study,
                           "--outbox", str(tmp_path / "outbox"), env=env)
        assert done.returncode == 0, done.stderr
        assert "2 result object(s) left in the outbox" in done.stderr and "1 series diagnosed before" in done.stdout
        assert box.waiting() == [] and len(pacs.instances()) == 3


# -- a DICOM node: C-STORE in, C-STORE out ----------------------------------------------------------------

def wait_for(check, seconds: float = 90.0):  # noqa: ANN001, ANN201
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    return check()


def test_listen_diagnoses_what_a_pacs_routes_to_it_and_stores_the_results_back(small_run, dicom_sources, tmp_path):
    import os

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from orthanc import Orthanc, free_port

    port = free_port()
    with Orthanc(tmp_path / "orthanc", modalities={"meddiag": ("MEDDIAG", "127.0.0.1", port)}) as pacs:
        node = subprocess.Popen([sys.executable, "-m", "meddiag", "listen", str(small_run), "--port", str(port),
                                 "--send-to", f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}", "--series-timeout", "1",
                                 "--max-series", "2", "--spool", str(tmp_path / "spool"), "--outbox", str(tmp_path / "outbox")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            scu = AE(ae_title="MODALITY")
            scu.add_requested_context(Verification)
            assert wait_for(lambda: (a := scu.associate("127.0.0.1", port, ae_title="MEDDIAG")).is_established and (a.release() or True), 60)
            # a PACS routing rule: Orthanc sends the CR to meddiag (C-STORE)
            oid = pacs.upload(dicom_sources[0])
            r = pacs.session.post(f"{pacs.url}/modalities/meddiag/store", json={"Resources": [oid], "Synchronous": True}, timeout=60)
            assert r.ok, r.text
            study = str(pydicom.dcmread(dicom_sources[0], stop_before_pixels=True).StudyInstanceUID)
            results = wait_for(lambda: (r := [i for i in pacs.instances() if i.get("Manufacturer") == "meddiag"]) and len(r) >= 2 and r, 120)
            assert sorted(i["Modality"] for i in results) == ["OT", "SR"]
            assert all(i["StudyInstanceUID"] == study for i in results)
            # a malformed object (no Series Instance UID: it belongs nowhere) is answered 'cannot understand'
            good = pydicom.dcmread(dicom_sources[1])
            bad = pydicom.dcmread(dicom_sources[1])
            del bad.SeriesInstanceUID
            scu2 = AE(ae_title="MODALITY")
            scu2.add_requested_context(good.SOPClassUID, good.file_meta.TransferSyntaxUID)
            assoc = scu2.associate("127.0.0.1", port, ae_title="MEDDIAG")
            assert assoc.is_established
            status = assoc.send_c_store(bad)
            assoc.release()
            assert int(status.Status) == 0xC210
            # and the node goes on: the whole image gets its results
            assoc = scu2.associate("127.0.0.1", port, ae_title="MEDDIAG")
            assert int(assoc.send_c_store(good).Status) == 0x0000
            assoc.release()
            other = str(good.StudyInstanceUID)
            assert wait_for(lambda: len([i for i in pacs.instances() if i.get("Manufacturer") == "meddiag"
                                         and i["StudyInstanceUID"] == other]) == 2, 120)
        finally:
            node.terminate()
            out, err = node.communicate(timeout=60)
    assert "series diagnosed" in err and not list((tmp_path / "outbox").glob("*.dcm"))
    for secret in ("Roe^Richard", "MRN-77", "CompressedSamples"):  # patient names and ids never in the log
        assert secret not in err + out


def test_listen_spools_on_disk_bounds_its_queue_and_leaves_non_images_alone(small_run, dicom_sources, tmp_path):
    from types import SimpleNamespace

    from pydicom.uid import generate_uid

    from meddiag import load
    from meddiag.pacs.listener import Destination, Listener

    node = Listener(load(small_run).predictor, spool=tmp_path / "spool", outbox=tmp_path / "outbox", max_series=2)

    def event(ds):  # noqa: ANN001, ANN202 - what pynetdicom hands the C-STORE handler
        return SimpleNamespace(dataset=ds, file_meta=ds.file_meta, assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="CT1")))

    codes = []
    for k in range(3):
        ds = pydicom.dcmread(dicom_sources[1])
        ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        codes.append(node._on_store(event(ds)))
    assert codes == [0x0000, 0x0000, 0xA700]  # the third series waits at its sender
    assert sorted(len(list(p.iterdir())) for p in (tmp_path / "spool").iterdir()) == [1, 1]  # on disk, one file each
    report = pydicom.dcmread(dicom_sources[1], stop_before_pixels=True)
    report.SeriesInstanceUID = generate_uid()
    assert node._on_store(event(report)) == 0x0000 and len(list((tmp_path / "spool").iterdir())) == 2  # no pixels: left alone
    # a listener started again finds the series a stop left behind
    again = Listener(load(small_run).predictor, spool=tmp_path / "spool", outbox=tmp_path / "outbox")
    assert len(again._last) == 2
    with pytest.raises(Exception, match="HOST:PORT:AET"):
        Destination.parse("pacs:104")


def test_the_rest_service_answers_dicom_results_as_dicomweb_does(small_run, dicom_sources):
    from io import BytesIO

    from fastapi.testclient import TestClient

    from meddiag.pacs.http import add_dicom_routes
    from meddiag.serving.app import ServeOptions, create_app
    from meddiag.serving.predictor import Predictor

    app = create_app(Predictor.from_run(small_run), small_run, ServeOptions(token="t0k"))
    add_dicom_routes(app)
    with TestClient(app) as client:
        files = [("files", (p.name, p.read_bytes(), "application/dicom")) for p in dicom_sources]
        assert client.post("/v1/dicom-results", files=files).status_code == 401
        r = client.post("/v1/dicom-results", files=files, headers={"Authorization": "Bearer t0k"})
        assert r.status_code == 200 and r.headers["content-type"].startswith('multipart/related; type="application/dicom"')
        boundary = r.headers["content-type"].split("boundary=")[1].encode()
        parts = [p.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n") for p in r.content.split(b"--" + boundary)[1:-1]]
        objects = [pydicom.dcmread(BytesIO(p)) for p in parts]
        assert sorted(o.Modality for o in objects) == ["OT", "OT", "SR", "SR"]
        sources = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in dicom_sources}
        assert {o.StudyInstanceUID for o in objects} == sources
        png = sorted((small_run.parent / "images").rglob("*.png"))[0]
        bad = client.post("/v1/dicom-results", files=[("files", ("x.png", png.read_bytes(), "image/png"))],
                          headers={"Authorization": "Bearer t0k"})
        assert bad.status_code == 415 and "x.png: not a DICOM file" in bad.json()["detail"]


def test_a_pacs_that_fails_is_retried_with_back_off_then_reported_by_what_failed():
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from meddiag.pacs.dicomweb import PacsError, with_retries

    answers: list[int] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the HTTP verb
            code = answers.pop(0) if answers else 200
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/studies"

    def get() -> int:
        r = requests.get(url, timeout=5)
        r.raise_for_status()
        return r.status_code

    try:
        answers[:] = [503, 502]
        start = time.perf_counter()
        assert with_retries("searching studies", get, attempts=4, first_wait=0.2) == 200
        assert time.perf_counter() - start >= 0.2 + 0.4  # waited, doubling
        answers[:] = [500] * 3
        with pytest.raises(PacsError, match="searching studies: the PACS answered HTTP 500 after 3 attempts"):
            with_retries("searching studies", get, attempts=3, first_wait=0.05)
        answers[:] = [404]
        with pytest.raises(PacsError, match="answered HTTP 404"):  # not worth retrying
            with_retries("searching studies", get, attempts=3, first_wait=0.05)
    finally:
        server.shutdown()
    with pytest.raises(PacsError, match="cannot be reached .* after 2 attempts"):
        with_retries("storing", lambda: requests.get(url, timeout=2), attempts=2, first_wait=0.05)


def test_a_source_value_its_vr_forbids_is_not_passed_on(small_run, tmp_path):
    source = SHARED_DATA / "dicom" / "deid_data" / "ctbrain1.dcm"  # PatientAge '75Y' (AS takes three digits: '075Y')
    assert pydicom.dcmread(source, stop_before_pixels=True).PatientAge == "75Y"
    proc = predict(small_run, str(source), "--dicom-out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 2
    for path in written:
        assert "PatientAge" not in pydicom.dcmread(path) and dciodvfy_errors(path) == []
