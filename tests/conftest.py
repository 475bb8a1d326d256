"""Test-wide settings: every piece of state (Prefect, matplotlib, torch hub) stays in a temp dir, never in $HOME."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_STATE = Path(tempfile.mkdtemp(prefix="ctcompare-tests-"))
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MPLCONFIGDIR"] = str(_STATE / "matplotlib")
os.environ["TORCH_HOME"] = str(_STATE / "torch")
os.environ["CTCOMPARE_HMAC_KEY"] = "test-secret-not-for-production"
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_backend():
    """One ephemeral Prefect API with a throw-away database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
