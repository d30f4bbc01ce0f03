"""A corpus of malformed and unusual files of every format meddiag reads, generated (never committed).

:func:`make_corpus` writes the files into a folder and returns what each one is: ``"bad"`` (must be
refused, each by name with a reason), ``"nonfinite"`` (NaN/inf pixels: must be refused, never
diagnosed) or ``"volume"`` (a genuine volume: refused by a 2D model), ``"valid"`` (an unusual but genuine
image: must be diagnosed) or ``"bad_or_valid"`` (damage a decoder may or may not notice: either
outcome, as long as the file is diagnosed or named).
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import write_dicom


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _nifti(arr: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(arr, np.eye(4)).to_bytes()


def _flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[p % len(out)] ^= 0xFF
    return bytes(out)


def _with_element(dicom: bytes, tag: int, vr: bytes, value: bytes) -> bytes:
    """``dicom`` (explicit VR little endian) with one short element inserted before the first element
    of a higher tag in the data set, bytes as given (pydicom refuses to write invalid values)."""
    group, element = tag >> 16, tag & 0xFFFF
    raw = struct.pack("<HH", group, element) + vr + struct.pack("<H", len(value)) + value
    pos = 132 + 12 + struct.unpack("<I", dicom[140:144])[0]  # after the file meta group
    while pos < len(dicom):
        g, e = struct.unpack("<HH", dicom[pos:pos + 4])
        if (g << 16 | e) > tag:
            return dicom[:pos] + raw + dicom[pos:]
        vr_here = dicom[pos + 4:pos + 6]
        if vr_here in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack("<I", dicom[pos + 8:pos + 12])[0]
        else:
            pos += 8 + struct.unpack("<H", dicom[pos + 6:pos + 8])[0]
    return dicom + raw


def make_corpus(root: Path, seed: int = 0) -> dict[Path, str]:
    """Write the corpus under ``root``; returns {path: "bad" | "nonfinite" | "volume" | "valid" | "bad_or_valid"}."""
    import pydicom

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    kinds: dict[Path, str] = {}

    def put(name: str, data: bytes, kind: str) -> None:
        path = root / name
        path.write_bytes(data)
        kinds[path] = kind

    gray = (rng.random((64, 48)) * 255).astype(np.uint8)
    png = _png(gray)
    jpeg = _encoded(Image.fromarray(gray), "JPEG", quality=90)
    tiff = _encoded(Image.fromarray(gray), "TIFF")
    bmp = _encoded(Image.fromarray(gray), "BMP")
    dcm_path = write_dicom(root / "_source.dcm", (rng.random((64, 64)) * 4000).astype(np.uint16),
                           RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    dcm = dcm_path.read_bytes()
    dcm_path.unlink()
    nii = gzip.compress(_nifti(rng.random((8, 8, 8)).astype(np.float32)))
    valid = {"png": png, "jpg": jpeg, "tif": tiff, "bmp": bmp, "dcm": dcm, "nii.gz": nii}

    # empty files and random bytes, under every extension
    for ext in (*valid, "dicom", "jpeg"):
        put(f"empty.{ext}", b"", "bad")
        put(f"random.{ext}", rng.bytes(3000), "bad")
    put("random_no_extension", rng.bytes(3000), "bad")
    put("text_file.txt", b"patient list, not an image\n", "bad")
    # truncations at many offsets
    for ext, data in valid.items():
        if ext == "nii.gz":
            continue
        for cut in (8, 64, 200, len(data) // 2):
            put(f"truncated_{cut}.{ext}", data[:cut], "bad")
        # the last bytes are often only an end marker or checksum: every pixel may still be there
        put(f"truncated_end.{ext}", data[:-16], "bad_or_valid")
    # bit flips in the header (the first bytes) and in the data
    for ext, data in (("png", png), ("jpg", jpeg), ("dcm", dcm), ("tif", tiff)):
        for i, positions in enumerate(([1, 2, 3], [12, 13, 20, 21], [140, 150, 160, 170], [300, 330, 360, 390, 420])):
            put(f"header_flip{i}.{ext}", _flip_bits(data, positions), "bad_or_valid")
        for i in range(3):
            put(f"data_flip{i}.{ext}", _flip_bits(data, list(rng.integers(len(data) // 2, len(data), 40))), "bad_or_valid")

    # lying DICOM headers
    def dicom_variant(name: str, kind: str, **changes: object) -> None:
        ds = pydicom.dcmread(io.BytesIO(dcm))
        for key, value in changes.items():
            setattr(ds, key, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        put(name, buf.getvalue(), kind)

    dicom_variant("lying_frames.dcm", "bad", NumberOfFrames=100_000)
    dicom_variant("lying_size.dcm", "bad", Rows=60_000, Columns=60_000)
    dicom_variant("lying_bits.dcm", "bad", BitsAllocated=32, BitsStored=32, HighBit=31)
    # RLE Lossless declared for uncompressed pixels (same UID length, so the bytes are swapped in place)
    put("lying_syntax.dcm", dcm.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.5\x00", 1), "bad")
    put("frames_not_a_number.dcm", _with_element(dcm, 0x00280008, b"IS", b"abc "), "bad")
    dicom_variant("slope_nan.dcm", "nonfinite", RescaleSlope=float("nan"))
    dicom_variant("intercept_inf.dcm", "nonfinite", RescaleIntercept=float("inf"))
    dicom_variant("window_nan.dcm", "valid", WindowCenter=float("nan"), WindowWidth=float("nan"))  # an unusable window is ignored
    ds = pydicom.dcmread(io.BytesIO(dcm))
    del ds.PixelData
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32, 32, 31, 0
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        delattr(ds, tag)
    ds.FloatPixelData = np.full((64, 64), np.nan, np.float32).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    put("float_pixels_nan.dcm", buf.getvalue(), "nonfinite")
    put("no_preamble.dcm", dcm[132:], "valid")
    put("no_preamble_no_extension", dcm[132:], "valid")
    # lying PNG header: a 50000 x 50000 image in a few bytes (a decompression bomb's header)
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    import zlib

    put("bomb_header.png", b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + png[33:], "bad")
    # NaN / inf in float TIFFs
    nan_tiff = np.full((32, 32), np.nan, np.float32)
    put("all_nan.tif", _encoded(Image.fromarray(nan_tiff, "F"), "TIFF"), "nonfinite")
    few_inf = rng.random((32, 32)).astype(np.float32)
    few_inf[3, 4] = np.inf
    put("few_inf.tif", _encoded(Image.fromarray(few_inf, "F"), "TIFF"), "nonfinite")
    # NIfTI volumes given to a 2D model, and a NIfTI of NaN
    put("volume.nii.gz", nii, "volume")  # readable, but not by a 2D model
    put("nan_volume.nii", _nifti(np.full((8, 8, 8), np.nan, np.float32)), "bad")

    # valid oddities
    put("one_pixel.png", _png(np.array([[200]], np.uint8)), "valid")
    put("sixteen_bit.png", _encoded(Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)), "PNG"), "valid")
    put("palette.png", _encoded(Image.fromarray(gray).convert("P"), "PNG"), "valid")
    put("cmyk.jpg", _encoded(Image.fromarray(np.stack([gray] * 3, -1)).convert("CMYK"), "JPEG"), "valid")
    rgba = np.dstack([gray, gray // 2, gray, np.full_like(gray, 128)])
    put("alpha.png", _png(rgba, "RGBA"), "valid")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    put("exif_rotated.jpg", _encoded(Image.fromarray(gray), "JPEG", exif=exif), "valid")
    put("constant.png", _png(np.full((32, 32), 7, np.uint8)), "valid")
    put("thin_strip.png", _png((rng.random((2, 2000)) * 255).astype(np.uint8)), "valid")
    put("non_ascii_ünïcödé_胸部.png", png, "valid")
    put("spaces in name.jpg", jpeg, "valid")
    put("UPPER.PNG", png, "valid")
    return kinds
