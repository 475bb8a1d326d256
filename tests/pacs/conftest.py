"""Fixtures of the PACS tests: a real Orthanc (tests/orthanc_server.py), once per session and one per test that
stops it. Without Orthanc they skip by name with the reason; under CI (CI=true) they fail instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.orthanc_server import OrthancServer, missing_reason


def require_orthanc() -> None:
    """Fail under CI, skip elsewhere, when Orthanc with DICOMweb cannot run on this machine."""
    reason = missing_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the PACS tests, but {reason}.")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the session (tests that share it use their own study dates or UIDs)."""
    require_orthanc()
    with OrthancServer(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture
def fresh_orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """An Orthanc of this test's own, which the test may stop."""
    require_orthanc()
    with OrthancServer(tmp_path / "orthanc") as server:
        yield server
