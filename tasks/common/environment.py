"""Facts about this machine and installation, each asked in one place: versions, the CPU's name, the time now."""

from __future__ import annotations

import importlib.util
import platform
import re
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

NOT_INSTALLED = "unknown (not installed)"


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (package metadata); None when it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def package_version(package: str) -> str | None:
    """A package's __version__ as it names itself (torch: '2.14.1+cu130', with the build its distribution's version
    leaves out), read from its version.py without importing it; else its distribution's version; None when it is
    not installed."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    return installed_version(package)


def ctcompare_version() -> str:
    """The installed ctcompare version, or NOT_INSTALLED (run from a checkout without `pip install`)."""
    return installed_version("ctcompare") or NOT_INSTALLED


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else platform's answer."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (e.g. 2026-01-31T12:00:00+00:00): every file's timestamp."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
