"""A real PACS for the tests: Orthanc with its DICOMweb plugin on 127.0.0.1 (free ports, temporary storage),
and the example CT series stamped with stable UIDs (imported by tests/integration/conftest.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests
from pydicom.uid import generate_uid

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
EXAMPLE_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "totalseg_example" / "example_ct_dicom"


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's .so as the Debian package installed it."""
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        listing = ""
    found = [Path(p) for p in listing.split() if p.endswith("libOrthancDicomWeb.so")]
    default = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    return found[0] if found else default if default.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """One running Orthanc: ``dicomweb`` is the DICOMweb root, ``rest`` Orthanc's own REST API."""

    process: subprocess.Popen
    port: int
    auth: tuple[str, str] | None = None
    log: Path | None = None
    uploaded: dict[str, str] = field(default_factory=dict)

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def upload(self, files: list[Path]) -> None:
        for f in files:
            r = requests.post(f"{self.rest}/instances", data=Path(f).read_bytes(), auth=self.auth, timeout=30)
            r.raise_for_status()

    def get(self, path: str):
        r = requests.get(f"{self.rest}{path}", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orthanc(root: Path, users: dict[str, str] | None = None, timeout_s: float = 30.0) -> Orthanc:
    """Orthanc on 127.0.0.1 with storage under ``root``; ``users`` turns HTTP basic authentication on."""
    plugin = dicomweb_plugin()
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    config = {
        "Name": "FADAL-test", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "HttpPort": port, "DicomServerEnabled": False, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {}, "HttpTimeout": 60,
        "Plugins": [str(plugin)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1, "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = root / "orthanc.log"
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=open(log, "w"),
                               stderr=subprocess.STDOUT)
    auth = next(iter(users.items())) if users else None
    server = Orthanc(process, port, auth, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{server.rest}/system", auth=auth, timeout=2).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within {timeout_s} s: {log.read_text()[-2000:]}")


def stamp_example_series(dest: Path, study_description: str = "CT abdomen planning", tag: str = "example",
                         drop_slice: int | None = None, modality: str = "CT") -> dict[str, str]:
    """The example series with stable UIDs written where they are blank (as an anonymiser would): SOP
    Class/Instance from the file meta header, Study/Series/Frame of Reference from a seed (``tag``: another tag,
    another study). ``drop_slice`` leaves one slice out (a series with a missing slice)."""
    dest.mkdir(parents=True, exist_ok=True)
    study = generate_uid(entropy_srcs=["fadal-test-study", tag])
    series = generate_uid(entropy_srcs=["fadal-test-series", tag])
    frame = generate_uid(entropy_srcs=["fadal-test-frame", tag])
    files = sorted(EXAMPLE_DICOM.iterdir())
    for i, f in enumerate(files):
        if drop_slice is not None and i == drop_slice:
            continue
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.get("SOPClassUID") or ds.file_meta.MediaStorageSOPClassUID
        sop = ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID
        if tag != "example":  # another study gets other instances
            sop = generate_uid(entropy_srcs=["fadal-test-sop", tag, str(sop)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or study
        ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or series
        ds.FrameOfReferenceUID = frame if tag != "example" else (ds.get("FrameOfReferenceUID") or frame)
        ds.PatientID = ds.get("PatientID") or f"FADAL-{tag}"
        ds.StudyDescription = study_description
        ds.Modality = modality
        ds.save_as(dest / f"{i:03d}.dcm")
    first = pydicom.dcmread(next(dest.iterdir()), stop_before_pixels=True)
    return {"study": str(first.StudyInstanceUID), "series": str(first.SeriesInstanceUID),
            "frame": str(first.FrameOfReferenceUID), "folder": str(dest)}
