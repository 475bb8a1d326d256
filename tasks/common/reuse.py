"""Skipping work whose inputs have not changed, so that a re-run of an unchanged comparison takes seconds.

A piece of work (a package, a compressed package, a deployment-cost measurement, an int8 comparison, a whole
report) records an inputs key beside its result: the SHA-256 of everything it was made from (file hashes,
settings, the CPU and torch for timings) and of the source code that makes it, so a change of the code redoes the
work too. The work is skipped when the key it would record equals the recorded one and its files are intact.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from data_schemas.dataset import DATASET_CARD_FILE
from data_schemas.files import sha256_file, sha256_json
from data_schemas.plan import RunPlan
from data_schemas.report import REPORT_HTML_FILE, RESULTS_FILE, ComparisonResults
from data_schemas.training import (
    CONFIG_FILE,
    LINEAR_MODEL_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    PROBE_DEPTHS_FILE,
    STATUS_FILE,
    TIMING_FILE,
    VAL_PREDICTIONS_FILE,
)
from data_schemas.visual import DATASET_LESIONS_FILE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGING_SOURCES = ("tasks/packaging", "reports/model_card.py", "reports/templates/model_card.md.j2")
SOURCE_SUFFIXES = (".py", ".j2", ".json", ".css", ".js")
CHECKSUMS_FILE = "SHA256SUMS"  # data_schemas.package.CHECKSUMS_FILE: `sha256sum -c` format

REPORT_INPUTS_FILE = "report_inputs.json"  # the inputs key of the report in REPORT_DIR (a hash: shareable)
REPORT_SOURCES = ("tasks", "reports", "flows", "data_schemas")  # the code a report is made with
RUN_OUTPUT_FILES = (CONFIG_FILE, STATUS_FILE, METRICS_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, TIMING_FILE,
                    LINEAR_MODEL_FILE, PROBE_DEPTHS_FILE)

_FILE_HASHES: dict[tuple[str, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int]:
    """A file's identity for the hash memory: resolved path, inode, size and modification time."""
    status = Path(path).stat()
    return str(Path(path).resolve()), status.st_ino, status.st_size, status.st_mtime_ns


def file_sha256(path: Path) -> str:
    """sha256_file, remembered in this process for an unchanged file (same inode, size and modification time): a
    package's 100 MB model.pt is hashed once per write, not once per check."""
    identity = _identity(path)
    if identity not in _FILE_HASHES:
        _FILE_HASHES[identity] = sha256_file(path)
    return _FILE_HASHES[identity]


def remember_file_sha256(path: Path, digest: str) -> None:
    """Record the SHA-256 of a file this process has just written from bytes it hashed while writing, so that
    file_sha256 does not read it back."""
    _FILE_HASHES[_identity(path)] = digest


@lru_cache(maxsize=8)
def code_sha256(sources: tuple[str, ...] = PACKAGING_SOURCES) -> str:
    """SHA-256 over the project's source files under `sources` (paths relative to the project root; folders are
    searched for SOURCE_SUFFIXES files): relative names and bytes, in name order."""
    digest = hashlib.sha256()
    files: set[Path] = set()
    for source in sources:
        path = PROJECT_ROOT / source
        if path.is_file():
            files.add(path)
        elif path.is_dir():
            files.update(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)
    for path in sorted(files):
        digest.update(path.relative_to(PROJECT_ROOT).as_posix().encode("utf-8"))
        digest.update(path.read_bytes())
    return digest.hexdigest()


def inputs_key(parts: Mapping[str, Any], sources: tuple[str, ...] = PACKAGING_SOURCES) -> str:
    """The inputs key of one piece of work: SHA-256 of its JSON-able inputs and of the code under `sources`."""
    return sha256_json({"inputs": dict(parts), "code": code_sha256(sources)})


def checksums_hold(folder: Path) -> bool:
    """True when every file SHA256SUMS lists in `folder` is there with that SHA-256."""
    sums = Path(folder) / CHECKSUMS_FILE
    if not sums.is_file():
        return False
    recorded = [line.split("  ", 1) for line in sums.read_text().splitlines() if "  " in line]
    return bool(recorded) and all((folder / name).is_file() and file_sha256(folder / name) == digest
                                  for digest, name in recorded)


def recorded_package_inputs(model_path: Path) -> str | None:
    """The inputs key inside a package's model.pt (its metadata only: the tensors stay memory-mapped), or None when
    there is no intact package there."""
    import torch

    model_path = Path(model_path)
    if not model_path.is_file() or not checksums_hold(model_path.parent):
        return None
    try:
        raw = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not reusable
        return None
    metadata = raw.get("metadata") if isinstance(raw, dict) else None
    return metadata.get("inputs_sha256") if isinstance(metadata, dict) else None


# ------------------------------------------------------------------------------------------------- whole report


def _content_sha256(path: Path) -> str:
    """A run file's SHA-256; a JSON file's without its time stamps (a skipped run rewrites them on every re-run)."""
    if path.suffix != ".json":
        return file_sha256(path)
    data = json.loads(path.read_text())
    return sha256_json({key: value for key, value in data.items() if key not in ("created_at", "updated_at")})


def report_inputs_key(*, plan: RunPlan, report_dir: Path, dataset_dir: Path, command: str) -> str:
    """SHA-256 of everything the evaluation, packages, pictures and report are made from: the plan, the split, the
    dataset (content hash, lesions), each planned run's outputs (status.json is rewritten whenever a run trains
    again), the cost estimates (not the wall-time prediction, which counts this run's own start), the command
    and the code (REPORT_SOURCES)."""
    card = json.loads((dataset_dir / DATASET_CARD_FILE).read_text())
    cost = json.loads((report_dir / "cost.json").read_text()) if (report_dir / "cost.json").is_file() else {}
    calibration = cost.get("calibration") or {}
    files = {r.run_dir: {name: _content_sha256(report_dir / r.run_dir / name) for name in RUN_OUTPUT_FILES
                         if (report_dir / r.run_dir / name).is_file()} for r in plan.runs}
    lesions = dataset_dir / DATASET_LESIONS_FILE
    return inputs_key({
        "plan": plan.model_dump(mode="json"), "splits": file_sha256(report_dir / plan.splits_file),
        "dataset": card.get("content_hash"), "lesions": file_sha256(lesions) if lesions.is_file() else None,
        "runs": files, "cost": [cost.get("config_hash"), calibration.get("key"), calibration.get("measured_at")],
        "command": command,
    }, REPORT_SOURCES)


def reusable_results(report_dir: Path, key: str) -> ComparisonResults | None:
    """The last report's results when it was made from the same inputs (report_inputs_key) and is still whole."""
    record = report_dir / REPORT_INPUTS_FILE
    whole = all((report_dir / name).is_file() for name in (RESULTS_FILE, REPORT_HTML_FILE, REPORT_INPUTS_FILE))
    try:
        if whole and json.loads(record.read_text()).get("inputs_sha256") == key:
            return ComparisonResults.model_validate_json((report_dir / RESULTS_FILE).read_text())
    except ValueError:  # a damaged record or results file: make the report again
        return None
    return None
