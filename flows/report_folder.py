"""A comparison's report folder: its inputs refused before any work starts, where its dataset is ingested (beside the
folder, never inside it) and its write lock (one comparison writes a report folder at a time)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard
from data_schemas.files import printable_path
from data_schemas.report import REPORT_LOCK_FILE, outermost_report_folder
from tasks.common.paths import refuse_non_folder

# How long a second comparison into the same report folder waits for the first before refusing: long enough for
# two started together to settle which one runs, far shorter than a comparison.
REPORT_LOCK_TIMEOUT_S = 30.0


def check_compare_paths(*, source: Path, report_dir: Path, labels: Path | None, weights: Path | None) -> None:
    """Refuse missing inputs and an unusable output folder with one sentence before any work starts."""
    if not source.exists():
        raise ValueError(f"{source} does not exist; give a DICOM folder or a dataset folder made by 'ctcompare ingest' "
                         "(the ingest/nightly deployment writes data/dataset).")
    if not source.is_dir():
        raise ValueError(f"{source} is a file; give a DICOM folder or a dataset folder made by 'ctcompare ingest'.")
    if not os.access(source, os.R_OK | os.X_OK):
        raise ValueError(f"{source} cannot be read (permission denied); give a folder you can read.")
    if not (source / "dataset.json").is_file():
        check_dicom_source(source, labels)
    else:
        check_dataset_labels(source)
    if labels is not None and not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist.")
    if weights is not None and not weights.is_file():
        raise ValueError(f"weights file {weights} does not exist.")
    refuse_non_folder(report_dir, "output")
    enclosing = outermost_report_folder(report_dir.parent)
    if enclosing is not None:
        raise ValueError(f"--out {report_dir} lies inside the report folder {enclosing}; give a folder outside it, "
                         "so that each report can be shared alone.")


def check_dataset_labels(dataset_dir: Path) -> None:
    """A dataset source must hold labelled images of at least two classes: refused otherwise, naming the ingest to
    fix (a dataset ingested without its labels file has none)."""
    try:
        card = DatasetCard.model_validate_json((dataset_dir / DATASET_CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the dataset's own reader says what is wrong with it, in its stage
    classes = sorted(label for label, count in card.label_distribution.items() if label and count)
    if len(classes) >= 2:
        return
    found = f"labelled images of one class only ({classes[0]})" if classes else "no labelled image"
    raise ValueError(
        f"dataset {dataset_dir} holds {found} and {card.n_unlabeled_images} unlabelled image(s); a comparison needs "
        "labelled images of two classes: run its ingest again with a labels file (--labels on the command line, the "
        "labels parameter of the ingest/nightly deployment, which writes data/dataset as shipped)."
    )


def check_dicom_source(source: Path, labels: Path | None) -> None:
    """A DICOM source must hold a file, and compare needs its labels (it trains on labelled images only): refused
    without --labels, naming a labels.csv found inside or beside the folder."""
    if next((path for path in source.rglob("*") if path.is_file()), None) is None:
        raise ValueError(f"source folder {source} holds no file; give a DICOM folder or a dataset folder made by "
                         "'ctcompare ingest'.")
    if labels is None:
        found = next((path for path in (source / "labels.csv", source.parent / "labels.csv") if path.is_file()), None)
        if found is not None:
            raise ValueError(f"a DICOM source needs --labels (compare trains on labelled images only); {found} is "
                             f"there: add --labels {found}.")
        raise ValueError("a DICOM source needs --labels, a labels CSV (see 'ctcompare ingest --help'): compare trains "
                         "on labelled images only.")


def dataset_folder(out_dir: Path, new_folder_per_run: bool) -> Path:
    """Where a DICOM source is ingested: beside the report folder, never inside it (re-runs ingest incrementally)."""
    return out_dir / "dataset" if new_folder_per_run else out_dir.parent / f"{out_dir.name}-dataset"


class ReportBusyError(RuntimeError):
    """Another comparison holds the report folder's write lock for longer than this one will wait."""


def report_write_lock(report_dir: Path) -> FileLock:
    """The report folder's write lock (REPORT_LOCK_FILE, via filelock): one comparison writes a report folder at a
    time, so no run reads another's plan.json or overwrites its packages. Re-entrant within a process (the command
    line takes it before Prefect starts, the flow again); entering it waits at most REPORT_LOCK_TIMEOUT_S, then
    raises ReportBusyError with one sentence."""
    return _ReportLock(str(Path(report_dir).resolve() / REPORT_LOCK_FILE), timeout=REPORT_LOCK_TIMEOUT_S,
                       thread_local=False, is_singleton=True)


class _ReportLock(FileLock):
    """FileLock whose timeout is ReportBusyError, a sentence naming the report folder."""

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            folder = Path(self.lock_file).parent
            raise ReportBusyError(
                f"report folder {printable_path(folder)} is being written by another comparison (waited "
                f"{REPORT_LOCK_TIMEOUT_S:g} s); run again when it has finished, or give another --out."
            ) from None
