"""Weights files already checked: a file that passed tasks.training.weights.read_weights_file is not loaded with torch
again by the next command while it is the same file, unchanged.

The record ($CTCOMPARE_CACHE_DIR/weights_checks.json, beside the cost stage's caches) keeps, per file and model, the
file's identity when it was checked (resolved path, device, inode, size, modification and status-change times in
nanoseconds: every write changes the status-change time, which no tool sets back), the checking code's identity
(tasks/training/weights.py and model_defs.py, torch's and torchvision's versions) and what the check found: the
SHA-256 and whether the name's hash prefix was checked. Anything different is checked again; a missing or damaged
record is no record. Only passed checks are recorded: a bad file is refused by the full check every time.

Imports neither torch nor torchvision.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata
from pathlib import Path

from pydantic import ValidationError

from data_schemas.arms import DEFAULT_MODEL
from data_schemas.files import read_model_json, sha256_file, sha256_json, write_model_json
from data_schemas.training import WeightsCheck, WeightsChecks, WeightsInfo
from tasks.common.paths import cache_folder

FileIdentity = tuple[str, int, int, int, int, int]


def weights_checks_path() -> Path:
    """weights_checks.json in the cache folder (tasks.common.paths.cache_folder), beside the cost stage's caches."""
    return cache_folder() / "weights_checks.json"


def file_identity(path: Path) -> FileIdentity:
    """(resolved path, device, inode, size, mtime_ns, ctime_ns) of an existing file."""
    status = os.stat(path)
    return (str(Path(path).resolve()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns,
            status.st_ctime_ns)


@functools.lru_cache(maxsize=1)
def checker_version() -> str:
    """What a check's verdict depends on besides the file: the checking code and torch's and torchvision's versions."""
    here = Path(__file__).parent
    return sha256_json({"torch": metadata.version("torch"), "torchvision": metadata.version("torchvision"),
                        "code": [sha256_file(here / name) for name in ("weights.py", "model_defs.py")]})


def _read() -> WeightsChecks:
    try:
        return read_model_json(weights_checks_path(), WeightsChecks)
    except (OSError, ValueError, ValidationError):  # missing or damaged: nothing recorded
        return WeightsChecks()


def recorded_check(path: Path, model: str = DEFAULT_MODEL) -> WeightsInfo | None:
    """What the last passed check of this file as `model` found, when the file and the checking code are unchanged
    since; else None."""
    try:
        identity = file_identity(path)
    except OSError:
        return None
    check = _read().checks.get(f"{model} {identity[0]}")
    if check is None or tuple(check.identity) != identity or check.checker != checker_version():
        return None
    return WeightsInfo(source="file", path=str(Path(path).expanduser()), file_name=Path(path).name,
                       sha256=check.sha256, hash_checked=check.hash_checked)


def remember_check(path: Path, model: str, info: WeightsInfo, identity_before: FileIdentity) -> None:
    """Record a passed check of `path` made from the file as it was at identity_before; nothing is recorded when
    the file changed meanwhile, or when the cache folder cannot be written (the next command checks again)."""
    try:
        if file_identity(path) != identity_before:
            return
        record = _read()
        record.checks[f"{model} {identity_before[0]}"] = WeightsCheck(
            identity=identity_before, checker=checker_version(), sha256=info.sha256, hash_checked=info.hash_checked)
        write_model_json(weights_checks_path(), record)
    except OSError:
        pass
