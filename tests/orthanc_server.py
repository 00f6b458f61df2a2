"""A real Orthanc (with its DICOMweb plugin) for the tests: own storage, free port, basic auth ON.

``orthanc`` (session fixture) starts ``Orthanc`` once per test session on a free localhost port
with its own storage folder and HTTP basic auth required, and stops it afterwards.  Tests that need
it skip with a clear reason where the binary or the plugin is absent (``make setup`` installs them
with ``infra/setup-orthanc`` where apt is usable).  :func:`start_orthanc` is also used by
``infra/orthanc/run.py``-style trials.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
USER, PASSWORD = "pdacscreen", "orthanc-test-password"


@dataclass
class OrthancServer:
    """A running Orthanc. ``dicomweb`` is the DICOMweb root (``http://127.0.0.1:PORT/dicom-web``)."""

    process: subprocess.Popen
    port: int
    storage: Path
    log_path: Path
    user: str = USER
    password: str = PASSWORD

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def source(self) -> str:
        """The pdacscreen source string for this server."""
        return f"dicomweb+{self.dicomweb}"

    def rest(self, method: str, path: str, **kw) -> requests.Response:
        """Orthanc's own REST API (for test bookkeeping only: deletes, statistics)."""
        r = requests.request(
            method, self.url + path, auth=(self.user, self.password), timeout=60, **kw
        )
        r.raise_for_status()
        return r

    def clear(self) -> None:
        """Delete every patient (each test starts from an empty PACS)."""
        for pid in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{pid}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _plugin() -> Path | None:
    for d in PLUGIN_DIRS:
        p = d / "libOrthancDicomWeb.so"
        if p.is_file():
            return p
    return None


def missing_reason() -> str | None:
    """Why Orthanc cannot be started here, or None."""
    if shutil.which("Orthanc") is None:
        return "the Orthanc binary is not installed (Debian: apt-get install orthanc orthanc-dicomweb; make setup does it where apt is usable)"
    if _plugin() is None:
        return f"the Orthanc DICOMweb plugin (libOrthancDicomWeb.so) is not in {[str(d) for d in PLUGIN_DIRS]} (apt-get install orthanc-dicomweb)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_config(*, storage: Path, port: int, user: str, password: str) -> dict:
    """The configuration the tests run (also documented in infra/orthanc/orthanc.json)."""
    return {
        "Name": "pdacscreen-test",
        "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"),
        "Plugins": [str(_plugin())],
        "HttpPort": port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": False,
        "HttpCompressionEnabled": False,
        "StorageCompression": False,
        "OverwriteInstances": True,
        "StableAge": 1,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "StudiesMetadata": "Full",
            "SeriesMetadata": "Full",
        },
    }


def start_orthanc(storage: Path, *, timeout_s: float = 60.0) -> OrthancServer:
    """Start Orthanc with storage under ``storage``; waits until its REST API answers."""
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = storage / "orthanc.json"
    cfg.write_text(
        json.dumps(orthanc_config(storage=storage, port=port, user=USER, password=PASSWORD))
    )
    log_path = storage / "orthanc.log"
    logf = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        ["Orthanc", str(cfg)], stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    server = OrthancServer(process=proc, port=port, storage=storage, log_path=log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {proc.returncode}: {log_path.read_text()[-2000:]}"
            )
        try:
            r = requests.get(server.url + "/system", auth=(USER, PASSWORD), timeout=2)
            if r.ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(
        f"Orthanc did not answer within {timeout_s} s: {log_path.read_text()[-2000:]}"
    )


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> OrthancServer:
    """A running Orthanc for the session (skips with the reason where it cannot run)."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()
