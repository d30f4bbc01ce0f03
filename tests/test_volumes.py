"""Volumes: DICOM series in any file order, mixed series, NIfTI in RAS, 4D choice, clear errors."""

import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from meddiag.data.volumes import read_dicom_series, read_nifti
from meddiag.errors import DataError, ImageReadError

from conftest import SHARED_DATA

SERIES = SHARED_DATA / "dicom" / "vs_seg_001_t1_series"
NIFTI = SHARED_DATA / "nifti"


@pytest.fixture(scope="module")
def series_volume():
    if not SERIES.exists():
        pytest.skip("shared DICOM series not available")
    (volume,) = read_dicom_series(SERIES)
    return volume


def test_series_becomes_a_ras_volume_with_spacing(series_volume):
    v = series_volume
    assert v.array.shape == (512, 512, 120) and len(v.sources) == 120
    assert v.spacing == pytest.approx((0.41015625, 0.41015625, 1.5), abs=1e-4)
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    assert v.modality == "MR" and v.series_instance_uid and v.excluded == []


def test_series_order_comes_from_positions_not_file_names(series_volume, tmp_path):
    files = sorted(SERIES.iterdir())
    names = [f"x{i:03d}.dcm" for i in range(len(files))]
    random.Random(7).shuffle(names)
    for src, name in zip(files, names):
        shutil.copy(src, tmp_path / name)
    (shuffled,) = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(shuffled.array, series_volume.array)
    np.testing.assert_allclose(shuffled.affine, series_volume.affine)
    # Slices follow the slice normal: positions along it increase with the slice index.
    zs = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in shuffled.sources[:5]]
    assert zs == sorted(zs) or zs == sorted(zs, reverse=True)


def test_mixed_series_are_separated_and_junk_is_excluded(tmp_path):
    if not SERIES.exists():
        pytest.skip("shared DICOM series not available")
    for i, src in enumerate(sorted(SERIES.iterdir())[:5]):
        ds = pydicom.dcmread(src)
        if i < 2:
            ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(tmp_path / f"s{i}.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    volumes = read_dicom_series(tmp_path)
    assert sorted(v.array.shape[2] if v.array.shape[2] < 10 else -1 for v in volumes) == [2, 3]
    assert [p for p, _ in volumes[0].excluded] == [str(tmp_path / "notes.txt")]


def test_inconsistent_slice_size_names_the_file(tmp_path):
    if not SERIES.exists():
        pytest.skip("shared DICOM series not available")
    for i, src in enumerate(sorted(SERIES.iterdir())[:3]):
        ds = pydicom.dcmread(src)
        if i == 2:
            ds.Rows = 256
        ds.save_as(tmp_path / f"s{i}.dcm")
    with pytest.raises(ImageReadError, match=r"s2.dcm.*256x512.*512x512"):
        read_dicom_series(tmp_path)


def test_nifti_left_stays_left(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)
    data[0, 2, 3] = 1.0  # the first voxel along i
    las = np.diag([-2.0, 2.0, 2.0, 1.0])  # i runs towards the patient's Left
    nib.save(nib.Nifti1Image(data, las), tmp_path / "las.nii.gz")
    v = read_nifti(tmp_path / "las.nii.gz")
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    # In LAS voxel 0 is the right-most; in RAS it must be the last along axis 0.
    assert np.unravel_index(v.array.argmax(), v.array.shape) == (3, 2, 3)
    assert v.spacing == pytest.approx((2.0, 2.0, 2.0))
    # The voxel keeps its place in the world.
    world_before = las @ np.array([0, 2, 3, 1])
    world_after = v.affine @ np.array([3, 2, 3, 1])
    np.testing.assert_allclose(world_before, world_after)


def test_shared_nifti_volumes_and_4d_choice():
    if not NIFTI.exists():
        pytest.skip("shared NIfTI data not available")
    ct = read_nifti(NIFTI / "niivue" / "CT_AVM.nii.gz")
    assert ct.array.ndim == 3 and nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    with pytest.raises(ImageReadError, match="4D file with 20 volumes.*0..19"):
        read_nifti(NIFTI / "nibabel" / "functional.nii")
    third = read_nifti(NIFTI / "nibabel" / "functional.nii", volume_index=2)
    assert third.array.ndim == 3
    with pytest.raises(ImageReadError, match="outside 0..19"):
        read_nifti(NIFTI / "nibabel" / "functional.nii", volume_index=20)


def test_corrupt_nifti_is_named(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(ImageReadError, match="bad.nii.gz.*not a readable NIfTI"):
        read_nifti(tmp_path / "bad.nii.gz")


def test_volume_windowing():
    from meddiag.data.volumes import Volume

    v = Volume(array=np.array([[[-1000.0, 0.0, 40.0, 1000.0]]], np.float32), affine=np.eye(4))
    np.testing.assert_allclose(v.to_unit("brain")[0, 0], [0, 0, 40 / 79, 1], atol=1e-6)
    np.testing.assert_allclose(v.to_unit()[0, 0], [0, 0.5, 0.52, 1])


def _blob_volume(label: int, rng, n: int = 20) -> np.ndarray:
    vol = rng.normal(100, 20, (n, n, n))
    zz, yy, xx = np.mgrid[:n, :n, :n]
    cx = n * (0.3 if label == 0 else 0.7)
    vol += 800 * np.exp(-((xx - cx) ** 2 + (yy - n / 2) ** 2 + (zz - n / 2) ** 2) / (2 * (n / 8) ** 2))
    return np.clip(vol, 0, 4000)


def _write_series(folder, vol, rng, patient):
    from conftest import write_dicom

    uid = f"1.2.826.0.1.{rng.integers(1e9)}"
    for k in rng.permutation(vol.shape[0]):  # written in shuffled order on purpose
        write_dicom(folder / f"slice{k:03d}.dcm", vol[k].astype(np.uint16), SeriesInstanceUID=uid, PatientID=patient,
                    ImagePositionPatient=[0, 0, float(2 * k)], ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                    PixelSpacing=[1, 1], InstanceNumber=int(k) + 1)


def test_folder_of_nifti_volumes_and_dicom_series_trains_in_3d(tmp_path):
    from meddiag.data import load_data
    from meddiag.data.inspection import inspect_data
    from test_end_to_end import meddiag

    rng = np.random.default_rng(0)
    root = tmp_path / "study"
    for label, name in enumerate(["benign", "malignant"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            nib.save(nib.Nifti1Image(_blob_volume(label, rng).astype(np.float32), np.eye(4)), root / name / f"v{i}.nii.gz")
        for i in range(2):
            _write_series(root / name / f"series{i}", _blob_volume(label, rng), rng, f"P{label}{i}")
    data = load_data(str(root), image_size=16, progress=False)
    assert data.spatial_dims == 3 and data.in_channels == 1
    assert sum(len(s) for s in data.splits.values()) == 24
    assert data.splits["train"].images.shape[1:] == (1, 16, 16, 16)
    report = inspect_data(str(root), progress=False)
    assert report.counts == {"(unsplit)": {"benign": 12, "malignant": 12}} and report.unreadable == []

    run = tmp_path / "run"
    proc = meddiag("train", str(root), "--model", "seed_cnn", "--epochs", "8", "--batch-size", "4", "--image-size", "20",
                   "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = meddiag("predict", str(run), str(root / "malignant" / "series0"), str(root / "benign" / "v0.nii.gz"))
    assert proc.returncode == 0, proc.stderr
    assert "series0" in proc.stdout and "v0.nii.gz" in proc.stdout


def test_a_stray_volume_among_images_is_excluded_by_name_and_an_even_mix_refused(tmp_path):
    from PIL import Image

    from meddiag.data import load_data
    from meddiag.errors import DataError

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / name / f"x{i}.png")
    stray = tmp_path / "a" / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), stray)
    with pytest.warns(UserWarning, match="v.nii.gz: a volume among 2D images"):
        data = load_data(str(tmp_path), progress=False)
    assert data.spatial_dims == 2 and sum(len(s) for s in data.splits.values()) == 20
    assert data.excluded == [(str(stray), "a volume among 2D images; a model takes one or the other")]

    even = tmp_path / "even"
    for name in ("a", "b"):
        (even / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(even / name / "x.png")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), even / name / "v.nii.gz")
    with pytest.raises(DataError, match="as many 2D images .* as volumes"):
        load_data(str(even), progress=False)


def test_volume_resampling_keeps_physical_proportions():
    from meddiag.data.volumes import Volume, volume_to_model_input

    # 40 x 40 voxels of 0.5 mm and 10 slices of 2 mm: a 20 x 20 x 20 mm cube.
    cube = Volume(array=np.ones((40, 40, 10), np.float32) * 7, affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    cube.array[0, 0, 0] = 0
    assert (volume_to_model_input(cube, 16) > 0).sum() >= 16**3 - 8
    # 20 x 20 x 10 mm: half as deep, so half the cube is padding.
    slab = Volume(array=np.ones((40, 40, 5), np.float32), affine=np.diag([0.5, 0.5, 2.0, 1.0]))
    slab.array[0, 0, 0] = 0
    out = volume_to_model_input(slab, 16)
    assert out.shape == (1, 16, 16, 16)
    filled = np.flatnonzero(out[0].max(axis=(0, 1)))
    assert len(filled) == 8 and filled[0] == 4, "the slab is centred along its short axis"
    assert (volume_to_model_input(slab, 16, fit="stretch")[0].max(axis=(0, 1)) > 0).all()


def _functional_group(**sequences) -> "pydicom.Dataset":
    """A functional-group item: ``PlanePositionSequence={"ImagePositionPatient": [...]}`` etc."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    group = Dataset()
    for name, attrs in sequences.items():
        inner = Dataset()
        for key, value in attrs.items():
            setattr(inner, key, value)
        setattr(group, name, Sequence([inner]))
    return group


def _write_enhanced(path, vol: np.ndarray, z_positions, **attributes):
    """An enhanced multi-frame CT: frame k of ``vol`` lies at z_positions[k]; rescale, spacing
    and orientation only in the functional groups, as enhanced files keep them."""
    from pydicom.sequence import Sequence

    from conftest import write_dicom

    shared = _functional_group(
        PlaneOrientationSequence={"ImageOrientationPatient": [1, 0, 0, 0, 1, 0]},
        PixelMeasuresSequence={"PixelSpacing": [0.5, 0.75], "SliceThickness": 3},
        PixelValueTransformationSequence={"RescaleSlope": 1, "RescaleIntercept": -1024},
    )
    per_frame = [_functional_group(PlanePositionSequence={"ImagePositionPatient": [0, 0, float(z)]}) for z in z_positions]
    return write_dicom(path, vol.astype(np.uint16), SharedFunctionalGroupsSequence=Sequence([shared]),
                       PerFrameFunctionalGroupsSequence=Sequence(per_frame), **attributes)


def test_enhanced_multiframe_dicom_is_a_volume_sorted_by_frame_position(tmp_path):
    from meddiag.data.volumes import read_volumes

    vol = np.arange(4)[:, None, None] * 100 + np.zeros((4, 6, 5))  # frame k holds 100 k
    order = [2, 0, 3, 1]  # stored out of order: frame i of the file is slice order[i]
    path = _write_enhanced(tmp_path / "ct.dcm", vol[order], [4.0 * k for k in order])
    (v,) = read_volumes(path)
    assert v.array.shape == (5, 6, 4) and nib.aff2axcodes(v.affine) == ("R", "A", "S")
    np.testing.assert_allclose(v.spacing, (0.75, 0.5, 4.0))  # columns, rows, slice step from the positions
    # Sorted inferior to superior, in Hounsfield units (rescale from the shared functional group).
    np.testing.assert_allclose(v.array[0, 0, :], [-1024, -924, -824, -724])
    assert v.sop_instance_uid and v.sources == [str(path)]


def test_shared_multiframe_files_read_as_volumes():
    from meddiag.data.volumes import read_volumes

    if not (SHARED_DATA / "dicom").exists():
        pytest.skip("shared DICOM data not available")
    (ct,) = read_volumes(SHARED_DATA / "dicom" / "pydicom_data" / "eCT_Supplemental.dcm")
    assert ct.array.shape == (512, 512, 2) and ct.modality == "CT"
    np.testing.assert_allclose(ct.spacing, (0.388672, 0.388672, 10.0))
    assert ct.array.min() == -1024 and ct.window == (49.0, 102.0)  # rescale and window from functional groups
    (mr,) = read_volumes(SHARED_DATA / "dicom" / "pydicom_data" / "emri_small.dcm")  # no positions: stored order
    assert mr.array.shape == (64, 64, 10) and mr.spacing[2] == pytest.approx(1.2)
    with pytest.raises(ImageReadError, match="CT_small.dcm.*single-frame"):
        read_volumes(SHARED_DATA / "dicom" / "pydicom_testfiles" / "CT_small.dcm")


def test_multiframe_dicom_and_4d_nifti_train_and_predict_in_3d(tmp_path):
    """Class folders of multi-frame DICOM files and of 4D NIfTI files: 3D training picks the
    volume asked for (--volume-index), the checkpoint keeps the choice, predict applies it."""
    from meddiag.data import load_data
    from meddiag.models import load_checkpoint
    from test_end_to_end import meddiag

    rng = np.random.default_rng(1)
    dicoms, niftis = tmp_path / "dicoms", tmp_path / "niftis"
    for label, name in enumerate(["benign", "malignant"]):
        for i in range(8):
            vol = _blob_volume(label, rng, 12)
            _write_enhanced(dicoms / name / f"ct{i}.dcm", vol, [2.0 * k for k in range(12)])
            # Volume 1 carries the signal, volume 0 is noise.
            four_d = np.stack([rng.normal(100, 20, vol.shape), vol], axis=-1).astype(np.float32)
            (niftis / name).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(four_d, np.eye(4)), niftis / name / f"v{i}.nii.gz")
    data = load_data(str(dicoms), image_size=12, progress=False)
    assert data.spatial_dims == 3 and sum(len(s) for s in data.splits.values()) == 16
    assert data.excluded == []
    with pytest.raises(DataError, match="none of the 16.*v0.nii.gz: a 4D file with 2 volumes: choose one"):
        load_data(str(niftis), image_size=12, progress=False)
    chosen = load_data(str(niftis), image_size=12, volume_index=1, progress=False)
    noise = load_data(str(niftis), image_size=12, volume_index=0, progress=False)
    assert not torch.equal(chosen.splits["train"].images, noise.splits["train"].images)

    run = tmp_path / "run"
    proc = meddiag("train", str(niftis), "--model", "seed_cnn", "--epochs", "1", "--batch-size", "4", "--image-size", "20",
                   "--volume-index", "1", "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(run / "checkpoints" / "best.ckpt")[1].volume_index == 1
    proc = meddiag("predict", str(run), str(niftis / "malignant" / "v0.nii.gz"), str(dicoms / "benign"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + 1 + 8 and "v0.nii.gz" in proc.stdout and "ct0.dcm" in proc.stdout
