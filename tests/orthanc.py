"""A real Orthanc PACS for the tests: started on 127.0.0.1 with a temporary configuration and storage, with its
DICOMweb plugin, a user and password, and the DICOM nodes it may send to; stopped afterwards."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "meddiag", "s3cret-pacs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """``with Orthanc(folder, modalities={"MEDDIAG": ("MEDDIAG", "127.0.0.1", 11112)}) as pacs: ...``"""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        assert Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file(), (
            "Orthanc and its DICOMweb plugin are not installed: the README's test command installs them "
            "(Debian: apt-get install orthanc orthanc-dicomweb)")
        self.folder, self.http_port, self.dicom_port = folder, free_port(), free_port()
        self.aet = "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "meddiag-test", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "HttpBindAddress": "127.0.0.1",
            "DicomModalities": {name: list(node) for name, node in (modalities or {}).items()},
            "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True, "StableAge": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.session = requests.Session()
        self.session.auth = (USER, PASSWORD)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Orthanc:
        self.log = open(self.folder / "orthanc.log", "w")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if self.session.get(f"{self.url}/system", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"Orthanc did not start: {(self.folder / 'orthanc.log').read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    # -- the REST API -----------------------------------------------------------------------------------

    def upload(self, path: Path) -> str:
        """Store a DICOM file; its Orthanc instance id."""
        r = self.session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
        r.raise_for_status()
        return r.json()["ID"]

    def instances(self) -> list[dict]:
        """Every instance Orthanc holds, with its main DICOM tags (study, series, SOP class, SOP instance UIDs)."""
        out = []
        for oid in self.session.get(f"{self.url}/instances", timeout=30).json():
            tags = self.session.get(f"{self.url}/instances/{oid}/simplified-tags", timeout=30).json()
            out.append({"id": oid, **tags})
        return out

    def file(self, oid: str) -> bytes:
        return self.session.get(f"{self.url}/instances/{oid}/file", timeout=30).content
