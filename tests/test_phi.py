"""Protected health information never leaves the DICOM reader: not in logs, errors, files or checkpoints."""

import csv
import re
from pathlib import Path

import numpy as np

from conftest import synthetic_image, write_dicom
from test_end_to_end import meddiag

PHI = ["Doe^Jane", "DOE", "PID-SECRET", "19700101", "ACC-XYZ-", "Springfield General", "WARDSECRET"]


def _phi_folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for label, name in enumerate(["normal", "pneumonia"]):
        for patient in range(10):
            k = label * 100 + patient
            for i in range(2):
                write_dicom(root / name / f"p{k}_{i}.dcm", synthetic_image(label, rng).astype(np.uint16),
                            PatientName=f"Doe^Jane{k}", PatientID=f"PID-SECRET-{k}", PatientBirthDate="19700101",
                            AccessionNumber=f"ACC-XYZ-{k}", InstitutionName="Springfield General",
                            ReferringPhysicianName="WARDSECRET",  # one component: highdicom warns of it, quoting it
                            WindowCenter=128, WindowWidth=256)
    broken = root / "normal" / "broken.dcm"
    broken.write_bytes((root / "normal" / "p0_0.dcm").read_bytes()[:700])  # header with PHI, pixels cut
    return root


def test_no_phi_in_any_output_and_patients_stay_in_one_split(tmp_path):
    data = _phi_folder(tmp_path / "study")
    run = tmp_path / "run"
    outputs = []
    proc = meddiag("inspect", str(data))
    assert proc.returncode == 0 and "broken.dcm" in proc.stdout
    outputs.append(proc.stdout + proc.stderr)
    proc = meddiag("train", str(data), "--model", "seed_cnn", "--epochs", "2", "--batch-size", "8",
                   "--image-size", "24", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "broken.dcm" in proc.stderr  # the bad file is named, by path only
    outputs.append(proc.stdout + proc.stderr)
    proc = meddiag("evaluate", str(run), "--split", "val")
    outputs.append(proc.stdout + proc.stderr)
    proc = meddiag("predict", str(run), str(data), "--output", str(tmp_path / "preds.csv"), "--dicom-out", str(tmp_path / "dicom"))
    assert proc.returncode == 1  # broken.dcm
    outputs.append(proc.stdout + proc.stderr)
    # the DICOM results carry the patient and study modules (so the PACS files them right), and are named by UIDs
    results = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(results) == 2 * 40 and all(re.fullmatch(r"[0-9.]+\.dcm", p.name) for p in results)
    assert all(b"PID-SECRET" in p.read_bytes() for p in results)
    assert not any(secret in str(p) for p in results for secret in PHI)

    blobs = [o.encode() for o in outputs]
    blobs += [p.read_bytes() for p in run.rglob("*") if p.is_file()]
    blobs.append((tmp_path / "preds.csv").read_bytes())
    for blob in blobs:
        for secret in PHI:
            assert secret.encode() not in blob, f"{secret!r} leaked"

    # Traceability without identity: predictions carry the DICOM object UIDs.
    rows = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert all(re.fullmatch(r"[0-9.]+", r["sop_instance_uid"]) for r in rows)

    # PatientID grouped the carved splits: each patient's two files are in one split.
    split_of_patient: dict[str, set[str]] = {}
    for split in ("train", "val", "test"):
        for row in csv.DictReader(open(run / "splits" / f"{split}.csv")):
            patient = Path(row["path"]).name.split("_")[0]
            split_of_patient.setdefault(patient, set()).add(split)
    assert len(split_of_patient) == 20
    assert all(len(s) == 1 for s in split_of_patient.values()), split_of_patient
