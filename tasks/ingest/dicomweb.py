"""A DICOMweb archive (a PACS such as Orthanc) as an ingest source: QIDO-RS finds the instances, WADO-RS retrieves
them into the dataset's private mirror, and the folder ingest reads that mirror (same decode path, same cache).

Under DATASET_DIR/private/dicomweb/ (owner-only: the file names are UIDs and the files hold identifiers):
    files/<StudyUID>/<SeriesUID>/<SOPUID>.dcm   every instance retrieved so far: the folder ingest's source
    index.json                                   SOP Instance UID -> path under files/ and SHA-256 of the file
    staging/<SOPUID>.dcm                         this run's retrievals, moved into files/ only once all succeeded

An instance whose SOP Instance UID is in the index, with its file still there under the same SHA-256, is not
retrieved again: a nightly run fetches only what is new. A run that fails part-way (server stopped, timeout,
refusal) moves nothing into files/, so the mirror and the dataset stay as the last complete run left them; the next
run reuses what was staged. Credentials come from a Prefect Secret block named by the caller or from environment
variables, never from a flow parameter: the parameter names the block, not the secret.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import partial
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydicom
import requests
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from data_schemas.files import atomic_write_bytes, atomic_write_text, sha256_file

DICOMWEB_DIR = "private/dicomweb"
MIRROR_FILES_DIR = "files"
MIRROR_INDEX_FILE = "index.json"
STAGING_DIR = "staging"
PRIVATE_FILE_MODE = 0o600

USER_ENV, PASSWORD_ENV, TOKEN_ENV = "CTCOMPARE_DICOMWEB_USER", "CTCOMPARE_DICOMWEB_PASSWORD", "CTCOMPARE_DICOMWEB_TOKEN"
# (connect, read) seconds per HTTP request; a server slower than this counts as not answering (and is retried).
HTTP_TIMEOUT_S = (5.0, 120.0)
# Seconds between the tries of a failed query or retrieval (Prefect task retries): a restart of the archive or a
# network blip of under a minute is ridden out; a refusal (HTTP 4xx other than 408/429) is never retried.
RETRY_DELAYS_S = [2.0, 10.0, 45.0]
RETRIABLE_STATUS = {408, 429, 500, 502, 503, 504}
QIDO_PAGE = 1000  # results asked for per QIDO request
INSTANCES_PER_BATCH = 32  # one retrieval task (retried as a unit); several run at once
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DATE_FORMS = "YYYYMMDD, YYYYMMDD-YYYYMMDD, yesterday, today or any"

TAG_STUDY_UID, TAG_SERIES_UID, TAG_SOP_UID, TAG_ACCESSION = "0020000D", "0020000E", "00080018", "00080050"
ACCESSION_COLUMN = "accession_number"  # a labels file keyed on it is translated to StudyInstanceUIDs (private)
ACCESSION_LABELS_FILE = "labels_by_study.csv"


class DicomWebError(ValueError):
    """The archive refused, could not be reached or did not answer: one sentence naming its URL and HTTP status.

    Args:
        message: the sentence.
        retriable: whether trying again may help (network faults, timeouts, HTTP 5xx, 408, 429).
    """

    def __init__(self, message: str, retriable: bool = False) -> None:
        super().__init__(message)
        self.retriable = retriable


# ---------------------------------------------------------------------------------------------------- arguments


def check_dicomweb_url(url: str) -> str:
    """The base URL without a trailing slash; ValueError when it is not http(s)://host[:port]/path or holds a
    password (credentials go in a Secret block or the environment, never in a URL that logs and the UI show)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{url!r} is not a DICOMweb URL; give http(s)://HOST:PORT/PATH, e.g. http://pacs:8042/dicom-web."
        )
    if parts.username or parts.password:
        raise ValueError(
            f"the DICOMweb URL must not hold credentials; set {USER_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}), "
            "or name a Prefect Secret block."
        )
    if parts.query or parts.fragment:
        raise ValueError(f"the DICOMweb URL {url!r} must be a base URL without a query (filters are options).")
    return url.strip().rstrip("/")


def is_dicomweb_url(source: str) -> bool:
    """Whether an ingest source names a DICOMweb server rather than a folder."""
    return source.strip().lower().startswith(("http://", "https://"))


def parse_study_date(text: str | None, today: date | None = None) -> str | None:
    """A QIDO StudyDate match: YYYYMMDD or YYYYMMDD-YYYYMMDD; 'yesterday' and 'today' in local time; None for any.

    Args:
        text: the date, range or word; None or 'any' for no date filter.
        today: the day 'today' means (default: the local date now).
    """
    value = (text or "any").strip().lower()
    today = today or datetime.now().date()
    if value == "any":
        return None
    if value in ("yesterday", "today"):
        return (today - timedelta(days=1 if value == "yesterday" else 0)).strftime("%Y%m%d")
    days = value.split("-")
    try:
        parsed = [datetime.strptime(day, "%Y%m%d").date() for day in days] if 1 <= len(days) <= 2 else []
    except ValueError:
        parsed = []
    if not parsed or any(len(day) != 8 for day in days) or parsed != sorted(parsed):
        raise ValueError(f"study date {text!r} is not valid; give {DATE_FORMS} (a range from its first to last day).")
    return value


def read_study_uids(path: Path) -> list[str]:
    """StudyInstanceUIDs from a text file, one per line ('#' comments and blank lines skipped); ValueError naming
    the first bad line (its number, never its text: a UID identifies a patient's study)."""
    if not path.is_file():
        raise ValueError(f"study list {path} does not exist.")
    uids = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        uid = line.split("#", 1)[0].strip()
        if not uid:
            continue
        if len(uid) > 64 or not UID_PATTERN.match(uid):
            raise ValueError(f"study list {path.name}, line {number}: not a DICOM UID (digits and dots, at most 64).")
        uids.append(uid)
    if not uids:
        raise ValueError(f"study list {path.name} holds no StudyInstanceUID.")
    return sorted(set(uids))


@dataclass(frozen=True)
class StudyQuery:
    """Which studies to take from the archive.

    Args:
        study_date: QIDO StudyDate match (parse_study_date), None for any date.
        modality: instances of series with this Modality only (and studies listing it in ModalitiesInStudy).
        accession: only the study with this AccessionNumber.
        study_uids: only these studies.
    """

    study_date: str | None = None
    modality: str = "CT"
    accession: str | None = None
    study_uids: tuple[str, ...] = ()

    def describe(self) -> str:
        """The filters in words, without identifiers (for logs and errors)."""
        parts = [f"modality {self.modality}", f"study date {self.study_date or 'any'}"]
        if self.accession:
            parts.append("one accession number")
        if self.study_uids:
            parts.append(f"{len(self.study_uids)} listed studies")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ connection


def resolve_credentials(secret_block: str | None) -> tuple[str, str] | str | None:
    """(user, password), a bearer token, or None: from the named Prefect Secret block (value 'user:password', a
    token, or JSON {"username", "password"} / {"token"}), else from CTCOMPARE_DICOMWEB_USER/_PASSWORD or _TOKEN."""
    if secret_block:
        from prefect.blocks.system import Secret

        value: Any = Secret.load(secret_block).get()
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("{"):
                value = json.loads(value)
            elif ":" in value:
                user, password = value.split(":", 1)
                return user, password
            else:
                return value
        if isinstance(value, dict) and "token" in value:
            return str(value["token"])
        if isinstance(value, dict) and "username" in value:
            return str(value["username"]), str(value.get("password", ""))
        raise ValueError(f"Secret block {secret_block!r} holds neither user:password nor a token.")
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    if os.environ.get(USER_ENV):
        return os.environ[USER_ENV], os.environ.get(PASSWORD_ENV, "")
    return None


def http_session(credentials: tuple[str, str] | str | None) -> requests.Session:
    """A requests session carrying the credentials (HTTP basic auth, or a bearer token)."""
    session = requests.Session()
    if isinstance(credentials, tuple):
        session.auth = credentials
    elif isinstance(credentials, str):
        session.headers["Authorization"] = f"Bearer {credentials}"
    return session


def open_client(url: str, secret_block: str | None = None) -> Any:
    """A dicomweb_client.DICOMwebClient for the base URL, its own retries off (Prefect's task retries do that)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url, session=http_session(resolve_credentials(secret_block)), timeout=HTTP_TIMEOUT_S)
    client.set_http_retry_params(retry=False)
    return client


def describe_failure(url: str, error: Exception, doing: str) -> DicomWebError:
    """One sentence naming the server's URL and the HTTP status (or that there was none) of a failed request."""
    if isinstance(error, DicomWebError):
        return error
    response = getattr(error, "response", None)
    if isinstance(error, requests.HTTPError) and response is not None:
        status = response.status_code
        verb = "refused" if status < 500 else "failed"
        return DicomWebError(
            f"the DICOMweb server at {url} {verb} {doing} (HTTP {status} {response.reason or ''}".rstrip() + ").",
            retriable=status in RETRIABLE_STATUS,
        )
    if isinstance(error, requests.Timeout):
        return DicomWebError(
            f"the DICOMweb server at {url} did not answer {doing} within {HTTP_TIMEOUT_S[1]:g} s (no HTTP status).",
            retriable=True,
        )
    if isinstance(error, requests.ConnectionError):
        return DicomWebError(
            f"the DICOMweb server at {url} cannot be reached for {doing} (no HTTP status: connection refused or "
            "broken).", retriable=True,
        )
    return DicomWebError(f"the DICOMweb server at {url} gave an unreadable answer to {doing} ({type(error).__name__}).")


# ------------------------------------------------------------------------------------------------------ query


@dataclass(frozen=True, order=True)
class InstanceRef:
    """One instance on the archive, by its three UIDs."""

    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str = field(default="", compare=False)

    def mirror_path(self) -> str:
        """Its place under files/ (POSIX, relative)."""
        return f"{self.study_uid}/{self.series_uid}/{self.sop_uid}.dcm"


def _first_value(item: dict[str, Any], tag: str) -> str:
    values = item.get(tag, {}).get("Value") or [""]
    return str(values[0])


def all_pages(search: Callable[..., list[dict[str, Any]]], tag: str) -> dict[str, dict[str, Any]]:
    """Every result of a QIDO search by its `tag` value, page by page (limit and offset).

    Pages end at a short or empty page. A server that answers a later page with results it gave already ignores
    the offset (Orthanc does for ModalitiesInStudy, which is why studies are not filtered by it): refused in one
    sentence rather than looping or losing results.
    """
    found: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = {_first_value(item, tag): item for item in search(limit=QIDO_PAGE, offset=offset)}
        page.pop("", None)
        if page.keys() & found.keys():
            raise DicomWebError(f"the DICOMweb server ignores the QIDO offset, so more than {QIDO_PAGE} results cannot "
                                "be listed; narrow the query (a shorter --study-date range).")
        found.update(page)
        if len(page) < QIDO_PAGE:
            return found
        offset += QIDO_PAGE


def find_studies(client: Any, query: StudyQuery) -> dict[str, str]:
    """StudyInstanceUID -> AccessionNumber ('' when none) of the studies matching the query (QIDO-RS, every page)."""
    filters: dict[str, str] = {}  # the modality is matched on the series (see all_pages)
    if query.study_date:
        filters["StudyDate"] = query.study_date
    if query.accession:
        filters["AccessionNumber"] = query.accession
    found: dict[str, str] = {}
    for uid in query.study_uids or (None,):
        matched = dict(filters, StudyInstanceUID=uid) if uid else filters
        studies = all_pages(partial(client.search_for_studies, search_filters=matched), TAG_STUDY_UID)
        found.update((study, _first_value(item, TAG_ACCESSION)) for study, item in studies.items())
    return dict(sorted(found.items()))


def find_instances(url: str, query: StudyQuery, secret_block: str | None = None) -> list[InstanceRef]:
    """Every instance of the matching studies' series of the query's modality (QIDO-RS studies, series, instances)."""
    client = open_client(url, secret_block)
    try:
        instances = []
        for study_uid, accession in find_studies(client, query).items():
            modality = {"Modality": query.modality}
            series = all_pages(partial(client.search_for_series, study_uid, search_filters=modality), TAG_SERIES_UID)
            for series_uid in sorted(series):
                sops = all_pages(partial(client.search_for_instances, study_uid, series_uid), TAG_SOP_UID)
                instances += [InstanceRef(study_uid, series_uid, sop, accession) for sop in sorted(sops)]
        return sorted(instances)
    except Exception as error:  # noqa: BLE001 - every failure becomes one sentence naming the URL
        raise describe_failure(url, error, "the study query") from None


# ----------------------------------------------------------------------------------------------------- mirror


@dataclass
class Mirror:
    """The dataset's private copy of the archive's instances (layout in the module docstring)."""

    root: Path
    index: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, dataset_dir: Path) -> Mirror:
        """The mirror of a dataset folder (created owner-only), with its index read."""
        root = Path(dataset_dir) / DICOMWEB_DIR
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        index_path = root / MIRROR_INDEX_FILE
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        return cls(root=root, index=index)

    @property
    def files_dir(self) -> Path:
        return self.root / MIRROR_FILES_DIR

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING_DIR

    def has(self, ref: InstanceRef) -> bool:
        """True when the instance is in the index and its file is there with the recorded SHA-256."""
        entry = self.index.get(ref.sop_uid)
        if entry is None:
            return False
        path = self.files_dir / entry["path"]
        return path.is_file() and sha256_file(path) == entry["sha256"]

    def missing(self, refs: list[InstanceRef]) -> list[InstanceRef]:
        """The instances not yet mirrored whole (by SOP Instance UID and content hash)."""
        return [ref for ref in refs if not self.has(ref)]

    def promote(self, refs: list[InstanceRef]) -> int:
        """Move every staged instance of refs into files/ and record it in the index; the index is rewritten
        once, atomically, after the moves. Returns how many were moved."""
        moved = 0
        for ref in refs:
            staged = self.staging_dir / f"{ref.sop_uid}.dcm"
            target = self.files_dir / ref.mirror_path()
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(staged, target)
            self.index[ref.sop_uid] = {"path": ref.mirror_path(), "sha256": sha256_file(target),
                                       "accession": ref.accession}
            moved += 1
        atomic_write_text(self.root / MIRROR_INDEX_FILE, json.dumps(self.index, indent=1, sort_keys=True) + "\n",
                          mode=PRIVATE_FILE_MODE)
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        return moved


    def accession_labels(self, labels_path: Path) -> Path:
        """A labels file keyed on accession_number, rewritten keyed on study_instance_uid for the mirrored studies
        (private/dicomweb/labels_by_study.csv, owner-only); ValueError naming rows, never their values."""
        with open(labels_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
        labels: dict[str, str] = {}
        for number, row in enumerate(rows, start=2):
            accession, label = (row.get(ACCESSION_COLUMN) or "").strip(), (row.get("label") or "").strip()
            if not accession or not label:
                raise ValueError(f"labels file {labels_path.name}, row {number}: empty {ACCESSION_COLUMN} or label.")
            labels[accession] = label
        by_study = {entry["path"].split("/")[0]: labels[entry.get("accession", "")]
                    for entry in self.index.values() if entry.get("accession", "") in labels}
        target, text = self.root / ACCESSION_LABELS_FILE, StringIO()
        csv.writer(text, lineterminator="\n").writerows([("study_instance_uid", "label"), *sorted(by_study.items())])
        atomic_write_text(target, text.getvalue(), mode=PRIVATE_FILE_MODE)
        return target


def keyed_on_accession(labels_path: Path) -> bool:
    """Whether a labels CSV's key column is accession_number."""
    with open(labels_path, newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    return ACCESSION_COLUMN in [name.strip() for name in header]


def batches(refs: list[InstanceRef], size: int = INSTANCES_PER_BATCH) -> list[list[InstanceRef]]:
    """Consecutive batches of at most `size` instances (a series stays together where it fits)."""
    return [refs[start : start + size] for start in range(0, len(refs), size)]


def retrieve_batch(url: str, refs: list[InstanceRef], staging_dir: Path, secret_block: str | None = None) -> int:
    """Retrieve instances (WADO-RS, as stored: any transfer syntax) into staging_dir/<SOPUID>.dcm, each written
    whole (atomic rename); instances already staged by an earlier try are kept. Returns how many were retrieved."""
    client = open_client(url, secret_block)
    staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    retrieved = 0
    for ref in refs:
        target = staging_dir / f"{ref.sop_uid}.dcm"
        if target.is_file():
            continue
        try:
            dataset = client.retrieve_instance(ref.study_uid, ref.series_uid, ref.sop_uid,
                                               media_types=(("application/dicom", "*"),))
        except Exception as error:  # noqa: BLE001 - every failure becomes one sentence naming the URL
            raise describe_failure(url, error, "an instance retrieval") from None
        if dataset.get("SOPInstanceUID") != ref.sop_uid:
            raise DicomWebError(f"the DICOMweb server at {url} returned another instance than the one asked for.")
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        atomic_write_bytes(target, buffer.getvalue(), durable=False, mode=PRIVATE_FILE_MODE)
        retrieved += 1
    return retrieved


# ------------------------------------------------------------------------------------------------ Prefect tasks


def retry_when_it_may_help(task: object, task_run: object, state: State) -> bool:
    """Retry network faults, timeouts and HTTP 5xx/408/429; never a refusal (401, 403, 404...)."""
    try:
        state.result()
    except DicomWebError as error:
        return error.retriable
    except Exception:  # noqa: BLE001 - a local fault (disk): retrying may help
        return True
    return True


@task(name="dicomweb-query", cache_policy=NO_CACHE, retries=len(RETRY_DELAYS_S), retry_delay_seconds=RETRY_DELAYS_S,
      retry_condition_fn=retry_when_it_may_help)
def find_instances_task(url: str, query: StudyQuery, secret_block: str | None = None) -> list[InstanceRef]:
    """QIDO-RS: the instances of the studies matching the query."""
    return find_instances(url, query, secret_block)


@task(name="dicomweb-retrieve", cache_policy=NO_CACHE, retries=len(RETRY_DELAYS_S),
      retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=retry_when_it_may_help,
      task_run_name="dicomweb-retrieve-{batch_index}")
def retrieve_batch_task(batch_index: int, url: str, refs: list[InstanceRef], staging_dir: Path,
                        secret_block: str | None = None) -> int:
    """WADO-RS: one batch of instances into the staging folder."""
    return retrieve_batch(url, refs, staging_dir, secret_block)
