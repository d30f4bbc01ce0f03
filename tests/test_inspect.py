"""meddiag inspect: counts, facts, unreadable files, and leakage between splits."""

import csv
import json
import shutil

import numpy as np
import pytest

from meddiag.data.inspection import inspect_data, render

from conftest import make_image_folder, synthetic_image, write_dicom
from test_end_to_end import meddiag


def test_counts_facts_and_unreadable_files(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=5, splits=("train", "test"))
    (root / "train" / "normal" / "bad.png").write_bytes(b"nope")
    report = inspect_data(str(root), progress=False)
    assert report.counts == {"test": {"normal": 5, "pneumonia": 5}, "train": {"normal": 5, "pneumonia": 5}}
    assert report.modalities == {"PNG": 20} and report.sizes == {"40x40": 20} and report.bit_depths == {"8": 20}
    assert report.unreadable == [{"path": str(root / "train" / "normal" / "bad.png"), "reason": "not an image format meddiag can decode"}]
    assert not report.leakage


def test_identical_images_across_splits_are_flagged(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=4, splits=("train", "test"))
    shutil.copy(root / "train" / "normal" / "img001.png", root / "test" / "normal" / "copy.png")
    report = inspect_data(str(root), progress=False)
    assert report.leakage and len(report.duplicate_images) == 1
    assert report.duplicate_images[0]["splits"] == ["test", "train"]
    assert "LEAKAGE" in render(report)


def test_patients_across_splits_are_flagged_without_their_ids(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        path = write_dicom(tmp_path / f"f{i}.dcm", synthetic_image(i % 2, rng).astype(np.uint16),
                           PatientID=f"SECRET-{i // 2}", PixelSpacing=[0.7, 0.7], BitsStored=12)
        rows.append({"path": path.name, "label": "ab"[i % 2], "split": "train" if i < 3 else "test"})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    report = inspect_data(str(tmp_path / "m.csv"), progress=False)
    assert report.modalities == {"CT": 6} and report.spacings == {"0.70x0.70 mm": 6} and report.bit_depths == {"12": 6}
    # Files 2 and 3 belong to patient SECRET-1, in train and test.
    assert [p["splits"] for p in report.patients_across_splits] == [["test", "train"]]
    assert "SECRET" not in render(report) and "SECRET" not in json.dumps(report.to_dict())


def test_medmnist_and_cli(shared_medmnist, tmp_path):
    proc = meddiag("inspect", "breastmnist", "--json", str(tmp_path / "r.json"), env={"MEDDIAG_DATA": str(shared_medmnist)})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["counts"]["train"] == {"malignant": 147, "normal, benign": 399}
    assert report["sizes"] == {"28x28": 780}
    assert "malignant" in proc.stdout and "unreadable files: 0" in proc.stdout


def test_a_folder_one_level_too_high_is_one_class_warned_by_inspect_and_refused_by_train(tmp_path):
    from conftest import make_image_folder
    from meddiag.data import load_data
    from meddiag.data.inspection import inspect_data, render
    from meddiag.errors import DataError

    make_image_folder(tmp_path / "top" / "dataset", per_class=3)
    report = inspect_data(str(tmp_path / "top"), progress=False)
    assert report.warnings and "only one class ('dataset')" in render(report)
    with pytest.raises(DataError, match="one level too high"):
        load_data(str(tmp_path / "top"), progress=False)
