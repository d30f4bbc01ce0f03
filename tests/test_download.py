"""Downloads against a local HTTP server on 127.0.0.1: md5 verified, atomic, corrupt files refused."""

import hashlib
import shutil

import pytest

from meddiag.data import download_file, fetch_medmnist, load_data, parse_medmnist
from meddiag.errors import DataError, DownloadError

from conftest import MEDMNIST_DIR


def test_download_with_good_md5(http_dir, tmp_path):
    root, url = http_dir
    payload = b"medical" * 100_000
    (root / "f.bin").write_bytes(payload)
    dest = download_file(f"{url}/f.bin", tmp_path / "out" / "f.bin", hashlib.md5(payload).hexdigest(), progress=False)
    assert dest.read_bytes() == payload
    assert not list((tmp_path / "out").glob("*.part"))


def test_download_with_wrong_md5_saves_nothing(http_dir, tmp_path):
    root, url = http_dir
    (root / "f.bin").write_bytes(b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch.*expected md5 0123"):
        download_file(f"{url}/f.bin", tmp_path / "f.bin", "0123" + "0" * 28, progress=False)
    assert list(tmp_path.glob("f.bin*")) == []


def test_download_of_missing_url_is_a_clear_error(http_dir, tmp_path):
    _, url = http_dir
    with pytest.raises(DownloadError, match="could not download.*place the file"):
        download_file(f"{url}/absent.npz", tmp_path / "absent.npz", None, progress=False)


def test_medmnist_file_downloaded_from_mirror_and_verified(http_dir, tmp_path, monkeypatch):
    if not (MEDMNIST_DIR / "breastmnist.npz").exists():
        pytest.skip("shared BreastMNIST not available")
    root, url = http_dir
    shutil.copy(MEDMNIST_DIR / "breastmnist.npz", root / "breastmnist.npz")
    monkeypatch.setenv("MEDDIAG_MEDMNIST_MIRROR", url)
    monkeypatch.setenv("MEDDIAG_DATA", str(tmp_path / "cache"))
    data = load_data("breastmnist")
    assert (tmp_path / "cache" / "breastmnist.npz").exists()
    assert len(data.splits["train"]) == 546


def test_corrupt_medmnist_download_is_refused(http_dir, tmp_path, monkeypatch):
    root, url = http_dir
    (root / "breastmnist.npz").write_bytes(b"not the official file")
    monkeypatch.setenv("MEDDIAG_MEDMNIST_MIRROR", url)
    with pytest.raises(DownloadError, match="expected md5 750601b1f35ba3300ea97c75c52ff8f6"):
        fetch_medmnist(parse_medmnist("breastmnist"), tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "breastmnist.npz").exists()


def test_local_file_with_wrong_md5_is_refused(tmp_path, monkeypatch):
    (tmp_path / "pneumoniamnist.npz").write_bytes(b"corrupt")
    monkeypatch.setenv("MEDDIAG_DATA", str(tmp_path))
    with pytest.raises(DataError, match="corrupt or not the official one. Delete it"):
        load_data("pneumoniamnist")


def test_official_url_is_used_without_a_mirror(monkeypatch):
    monkeypatch.delenv("MEDDIAG_MEDMNIST_MIRROR", raising=False)
    spec = parse_medmnist("pneumoniamnist@64")
    assert spec.url == "https://zenodo.org/records/10519652/files/pneumoniamnist_64.npz?download=1"
