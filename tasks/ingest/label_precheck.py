"""The labels file checked against the DICOM headers before any pixel is decoded.

A labels file keyed on values no file carries (another site's patient IDs, UIDs copied with a typo, paths from
another folder) would otherwise be found only after the whole decode. This pass reads each file's header up to
the key element (pydicom `stop_before_pixels`, `specific_tags`), converts it as ingest does (tasks.ingest.dicom_io) and
matches it with ingest's own key function (tasks.ingest.assemble.label_key), so it agrees with the labels ingest assigns.
It refuses, in one sentence, labels that match no file, and logs one line of counts when they match only some.
Messages give counts and the key column's name, never a key value: keys are patient identifiers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pydicom
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from data_schemas.dataset import DecodedFileRecord
from tasks.ingest.decode_pool import current_decode_pool
from tasks.ingest.dicom_io import header_value, text_up_to, uid, values_never_logged
from tasks.ingest.assemble import IngestError, LabelTable, SourceFile, label_key

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
    """

    key_column: str
    n_labels: int
    n_files: int
    n_matched_files: int
    n_matched_labels: int


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


def match_labels_to_headers(labels: LabelTable, sources: Sequence[SourceFile]) -> LabelMatch:
    """Count the files whose header key is in the labels file, and the labels some file carries. The headers are
    read on the workers of this process's decode pool when one is open (the ingest flow opens it first)."""
    pool = current_decode_pool()
    read_keys = partial(header_keys, key_column=labels.key_column)
    keys = pool.map_batches(read_keys, list(sources)) if pool is not None else read_keys(sources)
    matched_keys: set[str] = set()
    n_matched_files = 0
    for key in keys:
        if key is not None and key in labels.labels:
            n_matched_files += 1
            matched_keys.add(key)
    return LabelMatch(key_column=labels.key_column, n_labels=len(labels.labels), n_files=len(sources),
                      n_matched_files=n_matched_files, n_matched_labels=len(matched_keys))


def check_labels_match_headers(labels: LabelTable, sources: Sequence[SourceFile], log: Callable[[str], None]) -> LabelMatch:
    """IngestError (one sentence, counts only) when no file's header carries a key of the labels file; one log line
    of counts when only some files do. No pixel is decoded."""
    match = match_labels_to_headers(labels, sources)
    if sources and match.n_matched_files == 0:
        raise IngestError(
            f"no {match.key_column} in labels file {labels.source_name} matches any of the {match.n_files} file(s) "
            f"found: its {match.n_labels} label(s) were checked against the headers, before decoding; check that the "
            "key column holds the values stored in the DICOM headers."
        )
    if match.n_matched_files < match.n_files:
        log(f"Labels: {match.n_matched_files} of {match.n_files} file(s) have a {match.key_column} in "
            f"{labels.source_name} ({match.n_matched_labels} of {match.n_labels} label(s) used); the others stay unlabelled.")
    return match


@task(name="check-labels", cache_policy=NO_CACHE)
def check_labels_task(labels: LabelTable, sources: list[SourceFile]) -> LabelMatch:
    """check_labels_match_headers as a Prefect task, logging to the run's log."""
    return check_labels_match_headers(labels, sources, get_run_logger().info)
