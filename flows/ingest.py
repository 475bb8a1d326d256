"""The ingest flows: a DICOM folder or a DICOMweb archive -> dataset folder (its command: flows/cli/ingest.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from data_schemas.dataset import CACHE_DIR, PRIVATE_DIR, QuarantineReason, WindowSpec
from data_schemas.files import path_from_printable, printable_path
from flows.heartbeats import no_heartbeats
from flows.parameters import (
    Accession,
    AllowBurnedIn,
    CredentialsBlock,
    DaskAddress,
    DatasetFolder,
    DicomFolder,
    DicomWebUrl,
    FetchThreads,
    IngestLabels,
    IngestSize,
    Modality,
    StudyDate,
    StudyUidsFile,
    Window,
    Workers,
    as_seen,
)
from flows.run_logs import refused, tidy_run_logs
from flows.runners import chunk_task_runner
from reports.ingest_summary import dataset_card_markdown, quarantine_table
from tasks.common.paths import check_folder_writable, nearest_existing, refuse_non_folder
from tasks.common.progress import RunProgress, progress
from tasks.ingest import dicomweb
from tasks.ingest.assemble import IngestResult, assemble_dataset
from tasks.ingest.dataset_store import refuse_private_under_report
from tasks.ingest.decode import (
    CachedFile,
    chunk_is_cached_on_disk,
    chunk_sources,
    decode_chunk,
    decode_files,
    hu_values_per_file,
    load_cached_files,
    preprocessing_signature,
)
from tasks.ingest.dicomweb import Mirror, StudyQuery
from tasks.ingest.discover import SourceFile, discover_files
from tasks.ingest.errors import IngestError
from tasks.ingest.labels import LabelTable, check_labels_task, read_labels
from tasks.ingest.preprocess import parse_window

# Most files per decode chunk (one Prefect task run, cached and retried as a unit).
CHUNK_FILES = 256
# Fewer files than this are decoded without a pool of worker processes: starting them would cost more.
POOL_MIN_FILES = 32


def check_ingest_arguments(src_dir: Path, out_dir: Path, labels: Path | None, window: str) -> WindowSpec:
    """Refuse bad arguments with one sentence before any work starts."""
    if not src_dir.is_dir():
        raise ValueError(f"source folder {src_dir} does not exist or is not a folder.")
    if not os.access(src_dir, os.R_OK | os.X_OK):
        raise ValueError(f"source folder {src_dir} cannot be read (permission denied); give a folder you can read.")
    if next((path for path in src_dir.rglob("*") if path.is_file()), None) is None:
        raise ValueError(f"source folder {src_dir} holds no file; give a folder of DICOM files.")
    if labels is not None and not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist; a comparison trains on labelled images only, so give "
                         "the ingest its labels file.")
    refuse_non_folder(out_dir, "output")
    refuse_private_under_report(out_dir)
    spec = parse_window(window)
    try:  # checked without creating anything: a refused ingest leaves no folder behind
        check_folder_writable(out_dir)
    except OSError:
        raise ValueError(f"output folder {out_dir} cannot be written (checked {nearest_existing(out_dir)}).") from None
    return spec


def log_decode_failures(files: list[CachedFile], log: Callable[[str], None]) -> None:
    """One log line per file whose pixels could not be decoded, named by its content hash (its path may identify a
    patient: it stays in private/quarantine.csv)."""
    for item in files:
        record = item.record
        if record.reason in (QuarantineReason.DECODE_ERROR, QuarantineReason.DECODER_CRASHED):
            detail = record.message.removeprefix(f"{record.relative_path}: ")
            log(f"File sha256:{record.content_sha256[:12]} quarantined ({record.reason.value}): {detail}")


def unlabelled_warning(n_unlabelled: int, n_images: int, *, labelled_by_file: bool) -> str:
    """The WARNING of an ingest that leaves images without a label, which a comparison cannot train on."""
    if not labelled_by_file:
        return (f"{n_unlabelled} of {n_images} image(s) have no label: no labels file was given. A comparison trains "
                "on labelled images only; give this ingest its labels file (--labels, or the labels parameter of "
                "the ingest/nightly deployment).")
    return (f"{n_unlabelled} of {n_images} image(s) match no row of the labels file and have no label; a comparison "
            "trains on labelled images only.")


@flow(name="ingest")
def ingest_flow(
    src_dir: DicomFolder,
    out_dir: DatasetFolder,
    labels: IngestLabels = None,
    size: IngestSize = 224,
    window: Window = "lung",
    workers: Workers = 0,
    dask_address: DaskAddress = None,
    allow_burned_in: AllowBurnedIn = False,
) -> dict[str, Any] | State:
    """Turn a folder of DICOM CT files into a pseudonymized, schema-validated tensor dataset.

    allow_burned_in includes files whose header says BurnedInAnnotation YES and Secondary Capture objects,
    whose pixels may show names; by default they are quarantined.
    """
    tidy_run_logs()
    logger = get_run_logger()
    # Paths arrive as printable text (JSON parameters cannot hold a name that is not UTF-8): back to the real names.
    src, out = path_from_printable(src_dir).resolve(), path_from_printable(out_dir).resolve()
    labels = str(path_from_printable(labels)) if labels else None
    try:
        window_spec = check_ingest_arguments(src, out, Path(labels) if labels else None, window)
        label_table = read_labels(Path(labels)) if labels else None
    except ValueError as error:
        return refused(as_seen(str(error)))

    sources, discovery_rejects = discover_files(src)
    logger.info("Found %d file(s); %d rejected while listing", len(sources), len(discovery_rejects))
    cache_dir = out / CACHE_DIR / preprocessing_signature(size, window_spec)
    files = decode_sources(sources, out, cache_dir, size=size, window=window_spec, label_table=label_table,
                           workers=workers or os.cpu_count() or 1, dask_address=dask_address)

    result: IngestResult = assemble_dataset(files, discovery_rejects, out, cache_dir, size, window_spec, label_table,
                                            allow_burned_in=allow_burned_in)
    card = result.card
    log_decode_failures(files, logger.warning)
    logger.info(
        "%s %d image(s) of %d patient(s); %d file(s) quarantined",
        "Unchanged:" if result.skipped else "Wrote", card.n_images, card.n_patients, card.n_files_quarantined,
    )
    if card.n_unlabeled_images:
        logger.warning(unlabelled_warning(card.n_unlabeled_images, card.n_images, labelled_by_file=labels is not None))
    create_markdown_artifact(key="ctcompare-ingest-summary", markdown=dataset_card_markdown(card),
                             description="Ingested CT dataset")
    create_table_artifact(key="ctcompare-ingest-quarantine", description="Quarantined files by reason",
                          table=quarantine_table(card) or [{"reason": "none", "files": 0}])
    return {"dataset_dir": printable_path(out), "skipped": result.skipped, "card": card.model_dump(mode="json")}


def decode_sources(sources: list[SourceFile], out: Path, cache_dir: Path, *, size: int, window: WindowSpec,
                   label_table: LabelTable | None, workers: int, dask_address: str | None) -> list[CachedFile]:
    """Check the labels against the headers, then decode every file into the cache in chunk tasks (on a local
    decode pool or a Dask cluster); returns what the assembly needs of each file, in the order of `sources`."""
    logger = get_run_logger()
    # Locally the pool balances small batches, so chunks serve only as the unit of Prefect caching and retries; on
    # Dask the chunks themselves are balanced (at least 4 per worker). Large chunks mean fewer task runs, so less
    # API traffic.
    chunks = chunk_sources(sources, workers if dask_address else 1, max_chunk=CHUNK_FILES)
    on_disk = [chunk_is_cached_on_disk(chunk, cache_dir) for chunk in chunks]
    # A process pool pays for itself only when there is decoding to do: small or fully cached inputs go without one.
    pool_workers = 1 if len(sources) < POOL_MIN_FILES or all(on_disk) else workers
    to_decode = sum(len(chunk) for chunk, cached in zip(chunks, on_disk) if not cached)
    decoded: dict[str, CachedFile] = {}
    bar = RunProgress(f"ingest: {to_decode} of {len(sources)} file(s) to decode")
    with progress(to_decode, "decoded", "file", logger.info) as count_files:
        count_files = bar.counting(to_decode, "ingest: {done}/{total} files decoded", count_files)
        # Locally the pool counts each batch; on Dask the flow counts each finished chunk.
        with chunk_task_runner(pool_workers, decode_files, dask_address,
                               None if dask_address else count_files) as (runner, pool):
            if label_table is not None:  # headers only (on the pool's workers): labels matching no file are refused
                check_labels_task(label_table, sources, pool)
            # source paths, UIDs, the key: owner only
            (out / PRIVATE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
            futures = [
                runner.submit(
                    # A cached chunk result is trusted only while its decoded files are still on disk.
                    decode_chunk if cached else decode_chunk.with_options(refresh_cache=True),
                    {"chunk_index": i, "sources": chunk, "cache_dir": str(cache_dir), "size": size, "window": window,
                     "pool": pool},
                )
                for i, (chunk, cached) in enumerate(zip(chunks, on_disk))
            ]
            hu_per_file = hu_values_per_file(len(sources))  # a fixed total: memory flat as the archive grows
            for future, cached, chunk in zip(futures, on_disk, chunks):
                future.result()
                if dask_address and not cached:
                    count_files(len(chunk))
                # Each finished chunk's records are read while later chunks decode: assembly starts with them in hand.
                loaded = load_cached_files(chunk, cache_dir, hu_values=hu_per_file, pool=pool)
                decoded.update((item.record.relative_path, item) for item in loaded)
    bar.update(1, 1, f"ingest: {to_decode} file(s) decoded, {len(sources) - to_decode} read from the cache")
    return [decoded[source.relative_path] for source in sources]


def check_dicomweb_arguments(url: str, out_dir: Path, *, study_date: str, modality: str, accession: str | None,
                             study_uids_file: str | None, labels: Path | None, window: str) -> tuple[str, StudyQuery]:
    """Refuse bad arguments of a DICOMweb ingest with one sentence before any request or folder; returns the base
    URL and the query."""
    base_url = dicomweb.check_dicomweb_url(url)
    uids = tuple(dicomweb.read_study_uids(Path(study_uids_file))) if study_uids_file else ()
    # A named study (accession or list) is taken whatever its date unless a date is given explicitly.
    date_text = "any" if (accession or uids) and study_date == "yesterday" else study_date
    query = StudyQuery(study_date=dicomweb.parse_study_date(date_text), modality=modality.upper(),
                       accession=accession or None, study_uids=uids)
    if labels is not None and not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist.")
    refuse_non_folder(out_dir, "output")
    refuse_private_under_report(out_dir)
    parse_window(window)
    try:  # checked without creating anything: a refused ingest leaves no folder behind
        check_folder_writable(out_dir)
    except OSError:
        raise ValueError(f"output folder {out_dir} cannot be written (checked {nearest_existing(out_dir)}).") from None
    return base_url, query


def fetch_from_archive(url: str, out: Path, query: StudyQuery, credentials_block: str | None,
                       threads: int) -> dict[str, int]:
    """Query the archive, retrieve what the dataset's mirror lacks into staging (batches in parallel, each retried),
    then move it into the mirror only when every batch succeeded. Returns counts (found, fetched, already)."""
    logger = get_run_logger()
    retry = {"retries": len(dicomweb.RETRY_DELAYS_S), "retry_delay_seconds": dicomweb.RETRY_DELAYS_S}
    found = dicomweb.find_instances_task.with_options(**retry)(url, query, credentials_block)
    mirror = Mirror.open(out)
    missing = mirror.missing(found)
    logger.info("%d instance(s) on the archive match (%s); %d already in the dataset's mirror",
                len(found), query.describe(), len(found) - len(missing))
    retrieve = dicomweb.retrieve_batch_task.with_options(**retry)
    with ThreadPoolTaskRunner(max_workers=threads) as runner:
        futures = [
            runner.submit(retrieve, {"batch_index": i, "url": url, "refs": batch, "staging_dir": mirror.staging_dir,
                                     "secret_block": credentials_block})
            for i, batch in enumerate(dicomweb.batches(missing))
        ]
        errors = []
        for future in futures:
            try:
                future.result()
            except Exception as error:  # noqa: BLE001 - every batch is waited for; the first failure is reported
                errors.append(error)
    if errors:
        raise errors[0]
    mirror.promote(missing)
    return {"found": len(found), "fetched": len(missing), "already": len(found) - len(missing)}


@flow(name="ingest-dicomweb")
def ingest_dicomweb_flow(
    url: DicomWebUrl,
    out_dir: DatasetFolder,
    study_date: StudyDate = "yesterday",
    modality: Modality = "CT",
    accession: Accession = None,
    study_uids_file: StudyUidsFile = None,
    labels: IngestLabels = None,
    size: IngestSize = 224,
    window: Window = "lung",
    workers: Workers = 0,
    allow_burned_in: AllowBurnedIn = False,
    credentials_block: CredentialsBlock = None,
    fetch_threads: FetchThreads = 4,
) -> dict[str, Any]:
    """Ingest the CT studies of a DICOMweb archive (a PACS): new instances are retrieved into the dataset's private
    mirror, then the mirror is ingested as a folder; a re-run fetches only what is new.

    A failed retrieval (server stopped, timeout, refusal) ends in one sentence naming the URL and HTTP status and
    leaves the mirror and the dataset as the last complete run left them.
    """
    out = Path(out_dir).resolve()
    base_url, query = check_dicomweb_arguments(
        url, out, study_date=study_date, modality=modality, accession=accession, study_uids_file=study_uids_file,
        labels=Path(labels) if labels else None, window=window)
    files_dir, counts = mirror_archive(base_url, out, query, credentials_block, fetch_threads)
    if labels and dicomweb.keyed_on_accession(Path(labels)):  # the archive knows each study's accession number
        labels = str(Mirror.open(out).accession_labels(Path(labels)))
    with no_heartbeats():  # a subflow: the calling run has the heartbeat
        summary = ingest_flow(src_dir=str(files_dir), out_dir=str(out), labels=labels, size=size, window=window,
                              workers=workers, allow_burned_in=allow_burned_in)
    return {**summary, "archive": counts}


def mirror_archive(url: str, out: Path, query: StudyQuery, credentials_block: str | None,
                   threads: int = 4) -> tuple[Path, dict[str, int]]:
    """Bring the dataset folder's private mirror up to date with the archive (fetch_from_archive); returns the
    mirror's files folder (the folder ingest's source) and the counts. IngestError when the mirror stays empty."""
    (out / PRIVATE_DIR).mkdir(mode=0o700, parents=True, exist_ok=True)
    counts = fetch_from_archive(url, out, query, credentials_block, threads)
    mirror = Mirror.open(out)
    if not mirror.index:
        raise IngestError(f"no {query.modality} instance on {url} matches {query.describe()}; nothing to ingest.")
    return mirror.files_dir, counts
