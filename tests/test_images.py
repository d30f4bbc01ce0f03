"""Reading image files and preparing model input."""

import numpy as np
import pytest
from PIL import Image

from meddiag.data.channels import match_channels
from meddiag.data.images import read_image, to_model_input
from meddiag.errors import ImageReadError


def test_rgb_file_with_equal_channels_reads_as_grayscale(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(np.stack([gray] * 3, -1)).save(tmp_path / "x.png")
    arr = read_image(tmp_path / "x.png")
    assert arr.shape == (8, 8)
    np.testing.assert_array_equal(arr, gray)


def test_colour_file_keeps_three_channels(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png").shape == (8, 8, 3)


def test_16bit_png_is_scaled_by_its_own_range(tmp_path):
    arr16 = np.linspace(1000, 5000, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.jpg.*truncated"):
        read_image(tmp_path / "t.jpg")


def test_non_image_and_missing_files_are_refused(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "absent.png")


def test_pad_keeps_aspect_ratio_and_stretch_fills():
    wide = np.full((10, 40), 255, np.uint8)
    padded = to_model_input(wide, 20, 1, "pad")
    assert padded.shape == (1, 20, 20)
    # A 4:1 image fills 5 of 20 rows; the rest is black padding.
    assert padded[0, :, 10].tolist().count(255) == 5
    assert (to_model_input(wide, 20, 1, "stretch") == 255).all()


def test_channel_conversion_both_ways():
    gray = np.full((6, 6), 100, np.uint8)
    assert to_model_input(gray, 6, 3).shape == (3, 6, 6)
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 1] = 255
    out = to_model_input(rgb, 6, 1)
    assert out.shape == (1, 6, 6) and abs(int(out[0, 0, 0]) - round(0.587 * 255)) <= 1
    import torch

    batch = torch.from_numpy(np.stack([rgb.transpose(2, 0, 1)]))
    assert match_channels(batch, 1)[0, 0, 0, 0].item() == out[0, 0, 0]
