"""Labels: the labels file read and checked, each file's key, and the check of the file against the DICOM headers
before any pixel is decoded.

A labels file keyed on values no file carries (another site's patient IDs, UIDs copied with a typo, paths from
another folder) would otherwise be found only after the whole decode. The pre-check reads each file's header up to
the key element (pydicom `stop_before_pixels`, `specific_tags`), converts it as ingest does (tasks.ingest.dicom_io)
and matches it with ingest's own key function (label_key), so it agrees with the labels ingest assigns. It refuses,
in one sentence, labels that match no file, and logs one line of counts when they match only some. Messages give
counts and the key column's name, never a key value: keys are patient identifiers.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pydicom
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_schemas.dataset import MANIFEST_FILE, DecodedFileRecord, ManifestRow
from data_schemas.files import read_models_csv
from data_schemas.labels import LABEL_COLUMN, LABEL_KEY_COLUMNS
from tasks.ingest.decode_pool import DecodePool
from tasks.ingest.dicom_io import header_value, text_up_to, uid, values_never_logged
from tasks.ingest.discover import SourceFile, discover_files
from tasks.ingest.errors import IngestError


@dataclass
class LabelTable:
    """A validated labels file: which identifier it keys on, and key -> label."""

    key_column: str
    labels: dict[str, str] = field(default_factory=dict)
    source_name: str = ""


def read_labels(path: Path) -> LabelTable:
    """Read and check a labels CSV (one key column and `label`); errors name rows, never identifier values."""
    if not path.is_file():
        raise IngestError(f"labels file {path} does not exist.")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip() for name in (reader.fieldnames or [])]
        if LABEL_COLUMN not in columns:
            raise IngestError(f"labels file {path.name} has no '{LABEL_COLUMN}' column (columns found: "
                              f"{', '.join(columns) or 'none'}).")
        keys = [name for name in columns if name in LABEL_KEY_COLUMNS]
        if len(keys) != 1:
            raise IngestError(
                f"labels file {path.name} must have exactly one key column, one of {', '.join(LABEL_KEY_COLUMNS)}; "
                f"found {', '.join(keys) or 'none'} among {', '.join(columns)}."
            )
        key_column = keys[0]
        table: dict[str, str] = {}
        first_row: dict[str, int] = {}
        for row_number, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            key, label = row.get(key_column, ""), row.get(LABEL_COLUMN, "")
            if not key or not label:
                raise IngestError(f"labels file {path.name}, row {row_number}: empty {key_column} or {LABEL_COLUMN}.")
            if key_column == "path":
                key = Path(key).as_posix()
            if key in table and table[key] != label:
                raise IngestError(
                    f"labels file {path.name}: rows {first_row[key]} and {row_number} give the same {key_column} "
                    f"different labels ({table[key]!r} and {label!r})."
                )
            table.setdefault(key, label)
            first_row.setdefault(key, row_number)
    if not table:
        raise IngestError(f"labels file {path.name} has no rows.")
    return LabelTable(key_column=key_column, labels=table, source_name=path.name)


def label_key(record: DecodedFileRecord, key_column: str) -> str:
    return {
        "patient_id": record.patient_id,
        "study_instance_uid": record.study_instance_uid,
        "series_instance_uid": record.series_instance_uid,
        "sop_instance_uid": record.sop_instance_uid,
        "path": record.relative_path,
    }[key_column]


# The header element behind each key column and its converter, as tasks.ingest.dicom_io._file_record reads it ("path" is
# the file's place in the source folder and needs no header).
KEY_ELEMENTS: dict[str, tuple[str, Callable[[object], str]]] = {
    "patient_id": ("PatientID", text_up_to(64)),
    "study_instance_uid": ("StudyInstanceUID", uid),
    "series_instance_uid": ("SeriesInstanceUID", uid),
    "sop_instance_uid": ("SOPInstanceUID", uid),
}


@dataclass(frozen=True)
class LabelMatch:
    """How a labels file meets the files' headers (counts only: no identifier).

    Args:
        key_column: the labels file's key column.
        n_labels: keys in the labels file.
        n_files: files found in the source folder.
        n_matched_files: files whose key is in the labels file.
        n_matched_labels: keys of the labels file that some file carries.
        matched_classes: label -> files matched with that label.
    """

    key_column: str
    n_labels: int
    n_files: int
    n_matched_files: int
    n_matched_labels: int
    matched_classes: dict[str, int] = field(default_factory=dict)


def header_key_record(source: SourceFile, key_column: str) -> DecodedFileRecord | None:
    """A record holding only the file's path and its `key_column` value, read from the header alone; None when the
    header cannot be read or the element is missing or invalid (ingest then quarantines the file or leaves it
    unlabelled)."""
    if key_column == "path":
        return DecodedFileRecord(relative_path=source.relative_path, accepted=True)
    keyword, convert = KEY_ELEMENTS[key_column]
    try:
        with values_never_logged():
            header = pydicom.dcmread(source.path, stop_before_pixels=True, specific_tags=[keyword], force=True)
            value = header_value(header, keyword, convert, source.relative_path)
    except Exception:  # noqa: BLE001 - any unreadable header: the decode pass names its reason, not this one
        return None
    if not value:
        return None
    return DecodedFileRecord(relative_path=source.relative_path, accepted=True, **{key_column: value})


def header_keys(sources: Sequence[SourceFile], key_column: str) -> list[str | None]:
    """Each file's label key as ingest computes it (label_key), from its header alone; None where it has none."""
    keys = []
    for source in sources:
        record = header_key_record(source, key_column)
        keys.append(None if record is None else label_key(record, key_column))
    return keys


def match_labels_to_headers(labels: LabelTable, sources: Sequence[SourceFile],
                            pool: DecodePool | None = None) -> LabelMatch:
    """Count the files whose header key is in the labels file, and the labels some file carries. The headers are
    read on the workers of the decode pool when one is given (the ingest flow opens it first)."""
    read_keys = partial(header_keys, key_column=labels.key_column)
    keys = pool.map_batches(read_keys, list(sources)) if pool is not None else read_keys(sources)
    matched_keys: set[str] = set()
    classes: Counter[str] = Counter()
    for key in keys:
        if key is not None and key in labels.labels:
            classes[labels.labels[key]] += 1
            matched_keys.add(key)
    return LabelMatch(key_column=labels.key_column, n_labels=len(labels.labels), n_files=len(sources),
                      n_matched_files=sum(classes.values()), n_matched_labels=len(matched_keys),
                      matched_classes=dict(sorted(classes.items())))


def check_labels_match_headers(labels: LabelTable, sources: Sequence[SourceFile], log: Callable[[str], None],
                               pool: DecodePool | None = None) -> LabelMatch:
    """IngestError (one sentence, counts only) when no file's header carries a key of the labels file, or the files
    it matches hold one class only; one log line of counts when only some files match. No pixel is decoded; the
    headers are read on `pool` when given."""
    match = match_labels_to_headers(labels, sources, pool)
    if sources and match.n_matched_files == 0:
        raise IngestError(
            f"no {match.key_column} in labels file {labels.source_name} matches any of the {match.n_files} file(s) "
            f"found: its {match.n_labels} label(s) were checked against the headers, before decoding; check that the "
            "key column holds the values stored in the DICOM headers."
        )
    if sources and len(match.matched_classes) < 2:
        found = ", ".join(f"{count} '{label}'" for label, count in match.matched_classes.items())
        raise IngestError(
            f"labels file {labels.source_name} gives the {match.n_matched_files} file(s) it matches one class only "
            f"({found}); training and evaluation need at least two classes among the labelled images."
        )
    if match.n_matched_files < match.n_files:
        log(f"Labels: {match.n_matched_files} of {match.n_files} file(s) have a {match.key_column} in "
            f"{labels.source_name} ({match.n_matched_labels} of {match.n_labels} label(s) used); the others stay "
            "unlabelled.")
    return match


@task(name="check-labels", cache_policy=NO_CACHE)
def check_labels_task(labels: LabelTable, sources: list[SourceFile], pool: DecodePool | None = None) -> LabelMatch:
    """check_labels_match_headers as a Prefect task, logging to the run's log."""
    return check_labels_match_headers(labels, sources, get_run_logger().info, pool)


def check_labels_file(labels_path: Path, src_dir: Path, folds: int | None = None) -> LabelMatch:
    """The whole labels check, before any work (no Prefect, no pool): the file itself (read_labels: columns,
    conflicting rows), then its keys against the headers of the files in src_dir (matches, at least two classes
    among the matched files) and, given `folds`, enough labelled patients of each class for them. A ValueError
    (IngestError for the file), one sentence, on the first problem."""
    labels = read_labels(Path(labels_path))
    sources, _ = discover_files(Path(src_dir))
    match = check_labels_match_headers(labels, sources, lambda _: None)
    if folds is not None:
        check_folds_per_class(folds, patients_per_class(labels, sources))
    return match


def patients_per_class(labels: LabelTable, sources: Sequence[SourceFile]) -> dict[str, int]:
    """Labelled patients per class, from the headers alone (PatientID; a file without one counts as its own
    patient): what patient-level folds can be stratified over."""
    keys = header_keys(sources, labels.key_column)
    patients = keys if labels.key_column == "patient_id" else header_keys(sources, "patient_id")
    members: dict[str, set[str]] = {}
    for source, key, patient in zip(sources, keys, patients):
        if key is not None and key in labels.labels:
            members.setdefault(labels.labels[key], set()).add(patient or f"file:{source.relative_path}")
    return {label: len(group) for label, group in sorted(members.items())}


def check_folds_per_class(folds: int, counts: dict[str, int]) -> None:
    """ValueError (one sentence) unless every class has at least `folds` labelled patients: each patient-level fold
    must test both classes."""
    if counts and min(counts.values()) >= folds:
        return
    found = " and ".join(f"{count} '{label}'" for label, count in counts.items()) or "none"
    raise ValueError(f"--folds {folds} needs at least {folds} labelled patients of each class, so that every fold "
                     f"tests both; found {found}.")


def dataset_patients_per_class(dataset_dir: Path) -> dict[str, int]:
    """Labelled patients per class of an ingested dataset (its manifest); empty when it has no manifest yet."""
    manifest = Path(dataset_dir) / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    members: dict[str, set[str]] = {}
    for row in read_models_csv(manifest, ManifestRow):
        if row.label:
            members.setdefault(row.label, set()).add(row.patient_key)
    return {label: len(group) for label, group in sorted(members.items())}
