"""A real Orthanc DICOM server for tests: the Debian packages `orthanc` and `orthanc-dicomweb`, run from a JSON
config on a free loopback port with its storage in a temporary folder, stopped by its PID afterwards.

`make test` installs the packages when they are missing and it runs as root (`make orthanc`). Without them the
PACS tests are skipped with the reason, except under CI (CI=true), where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Self

import httpx

from tests.processes import free_port, wait_for_answer

PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
START_TIMEOUT_S = 30.0


def orthanc_executable() -> str | None:
    """The Orthanc server program, from PATH or where the Debian package puts it."""
    return shutil.which("Orthanc") or next((str(p) for p in (Path("/usr/sbin/Orthanc"),) if p.exists()), None)


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library of orthanc-dicomweb."""
    for folder in PLUGIN_FOLDERS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if found:
            return found[0]
    return None


def missing_reason() -> str | None:
    """Why no Orthanc with DICOMweb can run here, or None when it can."""
    if orthanc_executable() is None:
        return "Orthanc is not installed (as root: `make orthanc`, or apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (as root: apt-get install orthanc-dicomweb)"
    return None


class OrthancServer:
    """One Orthanc process with DICOMweb at `dicomweb_url`, storage under `state_dir`; no DICOM (DIMSE) port."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.process: subprocess.Popen | None = None
        self.log = self.state_dir / "orthanc.log"

    def _write_config(self) -> Path:
        storage = self.state_dir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ctcompare-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "DicomServerEnabled": False, "DicomPort": 0, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "HttpThreadsCount": 8, "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        path = self.state_dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def start(self) -> Self:
        """Start Orthanc and wait until its DICOMweb root answers; RuntimeError with its log otherwise."""
        config = self._write_config()
        with open(self.log, "wb") as handle:
            self.process = subprocess.Popen(
                [orthanc_executable(), str(config)], cwd=self.state_dir, stdout=handle, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        answered = wait_for_answer(
            self.process, lambda: httpx.get(f"{self.dicomweb_url}/studies", timeout=2).status_code == 200,
            START_TIMEOUT_S)
        if answered:
            return self
        if answered is False:
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def instance_count(self) -> int:
        """Instances stored, from Orthanc's own REST API (not DICOMweb)."""
        return int(httpx.get(f"{self.url}/statistics", timeout=10).json()["CountInstances"])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
