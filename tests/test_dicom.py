"""DICOM: Modality LUT, VOI windows and presets, MONOCHROME1, colour, compressed syntaxes, errors."""

import re

import numpy as np
import pytest

from meddiag.data import load_data
from meddiag.data.dicom import WINDOW_PRESETS, parse_window, read_dicom
from meddiag.data.images import is_image_file, read_image
from meddiag.errors import ImageReadError

from conftest import SHARED_DATA, synthetic_image, write_dicom

DICOM_DIR = SHARED_DATA / "dicom"

# What every file in ../shared/data/dicom gives (one slice stands for the 120-slice series):
# its shape, or the reason it is not an image to classify.
EXPECTED = {
    "deid_data/GREYSCALE_IMAGE.dcm": (768, 1024),          # ultrasound, uncompressed
    "deid_data/ctbrain1.dcm": (456, 510, 3),               # JPEG baseline, YBR_FULL_422
    "deid_data/ctbrain2.dcm": (456, 510, 3),
    "pydicom_data/693_J2KR.dcm": (512, 512),               # CT, JPEG 2000 lossless
    "pydicom_data/693_UNCR.dcm": (512, 512),
    "pydicom_data/JPEG-LL.dcm": (1024, 256),               # NM, JPEG lossless
    "pydicom_data/JPEG2000_UNC.dcm": (1024, 256),
    "pydicom_data/MR-SIEMENS-DICOM-WithOverlays.dcm": (484, 484),
    "pydicom_data/MR2_UNCR.dcm": (1024, 1024),
    "pydicom_data/RG1_J2KR.dcm": (1955, 1841),             # CR chest, MONOCHROME1, JPEG 2000
    "pydicom_data/RG1_UNCR.dcm": (1955, 1841),
    "pydicom_data/RG3_UNCR.dcm": (1760, 1760),
    "pydicom_data/US1_UNCR.dcm": (480, 640, 3),            # ultrasound, RGB
    "pydicom_data/eCT_Supplemental.dcm": (2, 512, 512),    # enhanced CT, 2 frames
    "pydicom_data/emri_small.dcm": (10, 64, 64),           # enhanced MR, 10 frames
    "pydicom_data/explicit_VR-UN.dcm": (512, 512),         # TCIA CT, JPEG 2000, UN VRs
    "pydicom_data/liver.dcm": "segmentation object (SEG) has no image to classify",
    "pydicom_testfiles/CT_small.dcm": (128, 128),
    "pydicom_testfiles/MR_small.dcm": (64, 64),
    "pydicom_testfiles/MR_small_RLE.dcm": (64, 64),        # RLE lossless
    "pydicom_testfiles/MR_small_jp2klossless.dcm": (64, 64),
    "vs_seg_001_t1_series/1-001.dcm": (512, 512),
}


@pytest.fixture
def shared_dicom():
    if not DICOM_DIR.exists():
        pytest.skip(f"shared DICOM data not found at {DICOM_DIR}")
    return DICOM_DIR


def test_every_shared_dicom_file_decodes_or_says_why(shared_dicom):
    found = {str(p.relative_to(shared_dicom)) for p in shared_dicom.rglob("*.dcm") if "vs_seg" not in str(p)}
    assert found | {"vs_seg_001_t1_series/1-001.dcm"} == set(EXPECTED)
    for name, expected in EXPECTED.items():
        if isinstance(expected, str):
            with pytest.raises(ImageReadError, match=re.escape(expected)):
                read_dicom(shared_dicom / name)
            continue
        image = read_dicom(shared_dicom / name)
        assert image.pixels.shape == expected, name
        if not image.is_colour:
            assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
            assert image.pixels.max() > image.pixels.min(), f"{name} decoded to a blank image"


def test_lossless_compression_gives_the_same_pixels(shared_dicom):
    for compressed, plain in [("pydicom_data/693_J2KR.dcm", "pydicom_data/693_UNCR.dcm"),
                              ("pydicom_data/RG1_J2KR.dcm", "pydicom_data/RG1_UNCR.dcm"),
                              ("pydicom_testfiles/MR_small_RLE.dcm", "pydicom_testfiles/MR_small.dcm"),
                              ("pydicom_testfiles/MR_small_jp2klossless.dcm", "pydicom_testfiles/MR_small.dcm")]:
        np.testing.assert_array_equal(read_dicom(shared_dicom / compressed).pixels, read_dicom(shared_dicom / plain).pixels)


def test_modality_lut_then_window_by_hand(tmp_path):
    # Stored 0, 1000, 1040, 2000 with intercept -1000 are -1000, 0, 40, 1000 HU.
    stored = np.array([[0, 1000], [1040, 2000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1, RescaleIntercept=-1000)
    brain = read_dicom(path, window="brain").pixels  # center 40, width 80: 0 HU -> 0, 79 HU -> 1
    np.testing.assert_allclose(brain, [[0.0, 0.0], [40 / 79, 1.0]], atol=1e-6)
    np.testing.assert_array_equal(read_dicom(path, window="40,80").pixels, brain)
    lung = read_dicom(path, window="lung").pixels  # center -600, width 1500: low end -600 - 0.5 - 749.5 = -1350
    np.testing.assert_allclose(lung, [[350 / 1499, 1350 / 1499], [1390 / 1499, 1.0]], atol=1e-6)


def test_the_files_own_window_is_the_default(tmp_path):
    stored = np.array([[0, 1000], [1040, 2000]], dtype=np.uint16)
    own = write_dicom(tmp_path / "own.dcm", stored, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=40, WindowWidth=80)
    np.testing.assert_array_equal(read_dicom(own).pixels, read_dicom(own, window="brain").pixels)
    bare = write_dicom(tmp_path / "bare.dcm", stored)  # no window: the image's own range
    np.testing.assert_allclose(read_dicom(bare).pixels, [[0, 0.5], [0.52, 1.0]])


def test_monochrome1_is_inverted(tmp_path):
    stored = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    m2 = read_dicom(write_dicom(tmp_path / "m2.dcm", stored)).pixels
    m1 = read_dicom(write_dicom(tmp_path / "m1.dcm", stored, PhotometricInterpretation="MONOCHROME1")).pixels
    np.testing.assert_allclose(m1, 1.0 - m2)


def test_window_names_and_errors():
    assert parse_window("Lung") == WINDOW_PRESETS["lung"]
    assert parse_window("40, 400") == (40.0, 400.0)
    assert parse_window(None) is None
    with pytest.raises(ValueError, match="lung, mediastinum"):
        parse_window("lungs")


def test_broken_dicom_files_are_named(tmp_path, shared_dicom):
    fake = tmp_path / "fake.dcm"
    fake.write_text("hello")
    with pytest.raises(ImageReadError, match="fake.dcm.*not a DICOM file"):
        read_dicom(fake)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((shared_dicom / "pydicom_testfiles/CT_small.dcm").read_bytes()[:5000])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(cut)
    with pytest.raises(ImageReadError, match="10 frames.*volume"):
        read_image(shared_dicom / "pydicom_data/emri_small.dcm")


def test_extensionless_dicom_files_are_found(tmp_path):
    path = write_dicom(tmp_path / "IM0001", np.zeros((4, 4), np.uint16))
    (tmp_path / "README").write_text("not an image")
    assert is_image_file(path) and not is_image_file(tmp_path / "README")


def test_dicom_beside_png_in_an_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["normal", "pneumonia"]):
        for i in range(12):
            img = synthetic_image(label, rng).astype(np.uint16) * 4
            if i % 2:
                write_dicom(tmp_path / name / f"s{i}.dcm", img, WindowCenter=510, WindowWidth=1020)
            else:
                from PIL import Image

                (tmp_path / name).mkdir(exist_ok=True)
                Image.fromarray((img // 4).astype(np.uint8)).save(tmp_path / name / f"p{i}.png")
    data = load_data(str(tmp_path), image_size=24, progress=False)
    assert sum(len(s) for s in data.splits.values()) == 24 and data.in_channels == 1
    assert any(p.endswith(".dcm") for s in data.splits.values() for p in s.paths)
