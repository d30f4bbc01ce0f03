"""Data sources: MedMNIST by name, image folders, CSV manifests, splits, and their errors."""

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddiag.data import load_data, parse_medmnist
from meddiag.data.splits import stratified_split
from meddiag.errors import DataError

from conftest import make_image_folder


def test_medmnist_names_and_sizes():
    spec = parse_medmnist("PneumoniaMNIST@64")
    assert (spec.name, spec.size, spec.file_name) == ("pneumoniamnist", 64, "pneumoniamnist_64.npz")
    assert parse_medmnist("bloodmnist").file_name == "bloodmnist.npz"
    assert parse_medmnist("not-a-dataset") is None
    with pytest.raises(DataError, match="sizes 28, 64, 128, 224"):
        parse_medmnist("pneumoniamnist@100")
    with pytest.raises(DataError, match="sizes 28, 64"):
        parse_medmnist("adrenalmnist3d@128")


def test_all_twelve_2d_medmnist_sets_are_known():
    names = ["pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
             "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist"]
    for name in names:
        for size in (28, 64, 128, 224):
            assert parse_medmnist(f"{name}@{size}").md5


def test_all_six_3d_medmnist_sets_are_known():
    for name in ["organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d", "vesselmnist3d", "synapsemnist3d"]:
        for size in (28, 64):
            spec = parse_medmnist(f"{name}@{size}")
            assert spec.info["spatial_dims"] == 3 and len(spec.md5) == 32


def test_adrenalmnist3d_loads_as_volumes(shared_medmnist):
    data = load_data("adrenalmnist3d")
    assert data.spatial_dims == 3 and data.splits["train"].images.shape[1:] == (1, 28, 28, 28)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 1188, "val": 98, "test": 298}


def test_pneumoniamnist_official_splits_and_class_names(shared_medmnist):
    data = load_data("pneumoniamnist")
    assert data.class_names == ["normal", "pneumonia"]
    assert data.task == "binary" and data.in_channels == 1 and data.image_size == 28
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 4708, "val": 524, "test": 624}
    train = data.splits["train"]
    assert train.images.dtype.is_floating_point is False and train.images.shape[1:] == (1, 28, 28)
    assert data.split_origin == {"train": "given", "val": "given", "test": "given"}


def test_medmnist_resized_on_request(shared_medmnist):
    data = load_data("breastmnist", image_size=32)
    assert data.splits["test"].images.shape[1:] == (1, 32, 32)
    assert data.class_names == ["normal, benign", "malignant"]  # the finding second (the file labels it 0)


def test_class_folder_layout_carves_stratified_val_and_test(image_folder):
    data = load_data(str(image_folder), image_size=32, progress=False)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sum(sizes.values()) == 60
    assert sizes == {"train": 42, "val": 6, "test": 12}
    for split in data.splits.values():  # each class kept in proportion
        assert split.class_counts(2)[0] == split.class_counts(2)[1]
    assert data.split_origin["val"] == data.split_origin["test"] == "carved from train"
    # No file in two splits, and the same seed gives the same split.
    paths = [set(s.paths) for s in data.splits.values()]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    again = load_data(str(image_folder), image_size=32, progress=False)
    assert again.splits["val"].paths == data.splits["val"].paths


def test_split_folders_are_used_as_given(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10, splits=("train", "test"))
    data = load_data(str(root), image_size=24, progress=False)
    assert data.split_origin == {"train": "given", "test": "given", "val": "carved from train"}
    assert len(data.splits["test"]) == 20 and len(data.splits["train"]) + len(data.splits["val"]) == 20
    assert data.in_channels == 1


def test_manifest_with_splits_and_patients(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=20)
    rows = []
    for i, path in enumerate(sorted(root.rglob("*.png"))):
        rows.append({"path": str(path.relative_to(tmp_path)), "label": path.parent.name, "patient_id": f"P{i // 4}"})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    data = load_data(str(tmp_path / "m.csv"), image_size=24, progress=False)
    patient_of = {str(tmp_path / r["path"]): r["patient_id"] for r in rows}
    seen = [{patient_of[p] for p in s.paths} for s in data.splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), "a patient is in two splits"


def test_manifest_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.csv").write_text("file,diagnosis\na.png,x\n")
    with pytest.raises(DataError, match="needs the columns path and label.*missing: path"):
        load_data(str(tmp_path / "bad.csv"))
    (tmp_path / "nolabel.csv").write_text("path,site\na.png,A\n")
    with pytest.raises(DataError, match="needs the columns path and label.*missing: label"):
        load_data(str(tmp_path / "nolabel.csv"))
    (tmp_path / "split.csv").write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(DataError, match="line 2.*holdout"):
        load_data(str(tmp_path / "split.csv"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_data(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="MedMNIST names"):
        load_data("pneumonnist")


def test_empty_class_folder_is_named(image_folder):
    (image_folder / "effusion").mkdir()
    with pytest.raises(DataError, match="effusion contains no images"):
        load_data(str(image_folder), progress=False)


def test_single_class_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("normal",))
    with pytest.raises(DataError, match="only the class 'normal'.*at least 2 classes"):
        load_data(str(root), progress=False)


def test_unreadable_images_are_excluded_by_name(image_folder):
    bad = image_folder / "normal" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = image_folder / "pneumonia" / "img000.png"
    truncated = image_folder / "pneumonia" / "cut.jpg"
    Image.open(good).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_data(str(image_folder), image_size=24, progress=False)
    excluded = dict(data.excluded)
    assert set(excluded) == {str(bad), str(truncated)}
    messages = " ".join(str(w.message) for w in caught)
    assert "broken.png" in messages and "cut.jpg" in messages
    assert sum(len(s) for s in data.splits.values()) == 60


def test_all_unreadable_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_text("nope")
    with pytest.raises(DataError, match="none of the 2 files"):
        load_data(str(tmp_path), progress=False)


def test_stratified_split_is_seeded_and_grouped():
    labels = np.array([0] * 50 + [1] * 150)
    keep, carve = stratified_split(labels, 0.2, seed=1)
    assert len(carve) == 40 and (labels[carve] == 1).sum() == 30
    assert np.array_equal(carve, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(carve, stratified_split(labels, 0.2, seed=2)[1])
    groups = [f"p{i // 5}" for i in range(200)]
    keep, carve = stratified_split(labels, 0.2, seed=0, groups=groups)
    assert not {groups[i] for i in keep} & {groups[i] for i in carve}


@pytest.mark.parametrize("classes, positive", [
    (("covid", "normal"), "covid"), (("NORMAL", "PNEUMONIA"), "PNEUMONIA"), (("benign", "melanoma"), "melanoma"),
    (("0", "1"), "1"), (("no finding", "effusion"), "effusion"),
])
def test_the_finding_is_the_positive_class_whatever_its_name_sorts_as(tmp_path, classes, positive):
    from conftest import make_image_folder
    from meddiag.data import load_data

    data = load_data(str(make_image_folder(tmp_path / "d", per_class=6, classes=classes)), image_size=16, progress=False)
    assert data.positive_class == positive and data.class_names[1] == positive
    train = data.splits["train"]
    assert all(Path(p).parent.name == data.class_names[int(y)] for p, y in zip(train.paths, train.labels))


def test_ambiguous_class_names_warn_and_positive_class_chooses(tmp_path):
    from conftest import make_image_folder
    from meddiag.data import load_data
    from meddiag.errors import ConfigError

    folder = make_image_folder(tmp_path / "d", per_class=6, classes=("site_a", "site_b"))
    with pytest.warns(UserWarning, match="Pass --positive-class"):
        assert load_data(str(folder), image_size=16, progress=False).positive_class == "site_b"
    data = load_data(str(folder), image_size=16, progress=False, positive_class="site_a")
    assert data.class_names == ["site_b", "site_a"]
    with pytest.raises(ConfigError, match="has the classes"):
        load_data(str(folder), image_size=16, progress=False, positive_class="site_c")


def test_breastmnist_reports_on_malignant(shared_medmnist):
    from meddiag.data import load_data

    data = load_data("breastmnist")
    assert data.class_names == ["normal, benign", "malignant"] and data.positive_class == "malignant"
    labels = data.splits["test"].labels
    assert int(labels.sum()) == 42  # the official test split holds 42 malignant images of 156
