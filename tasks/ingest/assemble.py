"""Ingest: a folder of DICOM files -> a pseudonymized tensor dataset (see data_schemas.dataset for the files).

Work is split in chunks of files; each chunk is one Prefect task run by the flow's task runner (processes
locally, or a Dask cluster). Each file's result is cached under private/cache by content hash and
preprocessing settings, so a re-run decodes only new or changed files and assembles the same dataset.
A file that cannot become an image is quarantined with a reason (convert_file never raises for what a file
holds). Assembly runs under the dataset folder's write lock and orders rows by content, never by pseudonym.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from prefect import task
from prefect.states import State

from data_schemas.dataset import (
    DATASET_CARD_FILE,
    IMAGES_FILE,
    LEGACY_QUARANTINE_FILE,
    MANIFEST_FILE,
    PRIVATE_DIR,
    PRIVATE_INDEX_FILE,
    QUARANTINE_FILE,
    UNLABELED_FILE,
    DatasetCard,
    DatasetFingerprint,
    DecodedFileRecord,
    ManifestRow,
    NumericSummary,
    PrivateIndexRow,
    QuarantineReason,
    QuarantineRow,
    WindowSpec,
)
from data_schemas.labels import LABEL_COLUMN, LABEL_KEY_COLUMNS
from tasks.ingest.dataset_store import (
    PRIVATE_FILE_MODE,
    DatasetBusyError,
    ImageBlocks,
    dataset_content_hash,
    dataset_write_lock,
    make_private_dirs,
    write_dataset,
)
from tasks.ingest.decode_pool import current_decode_pool, decode_in_children
from tasks.ingest.dicom_io import Rejected, read_ct_file
from data_schemas.files import (
    atomic_write_bytes,
    atomic_write_text,
    printable_path,
    read_models_csv,
    sha256_file,
    sha256_json,
    write_models_csv,
)
from tasks.ingest.preprocess import hu_frame_to_image, window_level_width
from tasks.ingest.pseudonymize import load_or_create_secret, pseudonym

# Bump when the conversion recipe changes: it invalidates every cached decode.
PREPROCESS_VERSION = 2  # 2: every header value validated; burned-in annotation and secondary capture recorded
HU_SAMPLE_STRIDE = 8
# HU values kept for the dataset's fingerprint over the whole archive, as nnU-Net's fingerprint does (a fixed total
# of sampled voxels, 10e7 there, divided among the cases): memory then stays flat as the archive grows. 8e6 float64
# values are 64 MB; up to about 2,000 files of one 512 x 512 frame each every sampled value is kept.
HU_SAMPLE_BUDGET = 8_000_000
# Below this many files, hashing stays on the calling thread (starting threads would cost more than it saves).
HASH_THREADS_MIN_FILES = 32
INGEST_STATE_FILE = "private/ingest_state.json"
# How long a second ingest into the same dataset folder waits for the first to finish writing.
DATASET_LOCK_TIMEOUT_S = 600.0
# Errors that mean "this folder cannot take more bytes": reported as one sentence naming the folder, never retried.
UNWRITABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class IngestError(ValueError):
    """Ingest cannot go on (bad labels file, nothing ingested): one sentence for the user."""


class OutputWriteError(IngestError):
    """The dataset folder cannot be written (disk full, read-only, busy): one sentence naming the folder."""


@dataclass(frozen=True)
class SourceFile:
    """A discovered file: absolute path (as the file system names it: bytes that are not UTF-8 held as surrogates),
    path relative to the source folder (POSIX, printable_path: what records, CSV files and messages show) and
    content hash."""

    path: str
    relative_path: str
    content_sha256: str


def _relative(path: Path, root: Path) -> str:
    """The path relative to root, as printable text (a name that is not UTF-8 is shown with \\xNN escapes)."""
    return printable_path(path.relative_to(root).as_posix())


def discover_files(src_dir: Path) -> tuple[list[SourceFile], list[QuarantineRow]]:
    """Walk src_dir recursively (following folder links once), whatever the extensions, and hash each file."""
    candidates: list[tuple[Path, str]] = []
    rejected: list[QuarantineRow] = []

    def reject(relative: str, reason: QuarantineReason, text: str) -> None:
        rejected.append(QuarantineRow(relative_path=relative, reason=reason, message=f"{relative}: {text}"))

    root_stat = src_dir.stat()
    visited: set[tuple[int, int]] = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [src_dir]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            reject(_relative(directory, src_dir) or ".", QuarantineReason.UNREADABLE, f"folder cannot be listed ({error.strerror})")
            continue
        for entry in entries:
            path = Path(entry.path)
            relative = _relative(path, src_dir)
            try:
                info = os.stat(path)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    reject(relative, QuarantineReason.SYMLINK_LOOP, "symbolic link loop")
                else:
                    reject(relative, QuarantineReason.UNREADABLE, f"cannot be read ({error.strerror})")
                continue
            if stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) in visited:
                    reject(relative, QuarantineReason.SYMLINK_LOOP, "link to a folder already visited (symbolic link loop)")
                else:
                    visited.add((info.st_dev, info.st_ino))
                    stack.append(path)
                continue
            if not stat.S_ISREG(info.st_mode):
                reject(relative, QuarantineReason.UNREADABLE, "not a regular file (pipe, socket or device)")
                continue
            candidates.append((path, relative))
    files: list[SourceFile] = []
    for (path, relative), content_sha256 in zip(candidates, _hash_files([path for path, _ in candidates])):
        if isinstance(content_sha256, OSError):
            reject(relative, QuarantineReason.UNREADABLE, f"cannot be read ({content_sha256.strerror})")
        else:
            files.append(SourceFile(path=str(path), relative_path=relative, content_sha256=content_sha256))
    files.sort(key=lambda item: item.relative_path)
    return files, rejected


def _hash_or_error(path: Path) -> str | OSError:
    try:
        return sha256_file(path)
    except OSError as error:
        return error


def _hash_files(paths: list[Path]) -> list[str | OSError]:
    """SHA-256 of each file, in order, on one thread per core: reading and hashlib release the GIL, so the threads
    hash in parallel without a process pool (an unreadable file gives its OSError in its place)."""
    if len(paths) < HASH_THREADS_MIN_FILES:
        return [_hash_or_error(path) for path in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ctcompare-hash") as threads:
        return list(threads.map(_hash_or_error, paths))


def preprocessing_signature(size: int, window: WindowSpec) -> str:
    """Identity of the conversion recipe; cached decodes are reused only under the same signature."""
    return sha256_json({"size": size, "window": window.model_dump(), "version": PREPROCESS_VERSION})[:16]


def cache_path(cache_dir: Path, content_sha256: str) -> Path:
    """Where one file's decoded result lives: private/cache/<recipe>/<sha[:2]>/<sha>.npz."""
    return Path(cache_dir) / content_sha256[:2] / f"{content_sha256}.npz"


@dataclass
class ConvertedFile:
    """One file after validation and conversion: its record, and its images and HU sample (empty if rejected)."""

    record: DecodedFileRecord
    images: np.ndarray  # (F, size, size) float16 in [0, 1]
    hu_sample: np.ndarray  # float32


def _rejected_file(source: SourceFile, size: int, reason: QuarantineReason, message: str) -> ConvertedFile:
    record = DecodedFileRecord(relative_path=source.relative_path, content_sha256=source.content_sha256, accepted=False, reason=reason, message=message)
    return ConvertedFile(record=record, images=np.zeros((0, size, size), np.float16), hu_sample=np.zeros(0, np.float32))


def convert_file(source: SourceFile, size: int, window: WindowSpec) -> ConvertedFile:
    """Validate, decode and convert one file; never raises for anything the file holds (it is quarantined instead)."""
    try:
        decoded = read_ct_file(Path(source.path), source.relative_path)
        monochrome1 = decoded.record.photometric_interpretation == "MONOCHROME1"
        converted = [hu_frame_to_image(frame, window, size, monochrome1) for frame in decoded.hu_frames]
        images = np.stack([image for image, _ in converted]).astype(np.float16)
    except Rejected as rejected:
        return _rejected_file(source, size, rejected.reason, rejected.message)
    except MemoryError:
        raise  # the machine, not the file: let the task fail and be retried
    except Exception as error:  # a kind of broken file no check above foresaw: one file, not the whole run
        message = f"{source.relative_path}: could not be converted ({type(error).__name__})"
        return _rejected_file(source, size, QuarantineReason.DECODE_ERROR, message)
    hu_sample = decoded.hu_frames[:, ::HU_SAMPLE_STRIDE, ::HU_SAMPLE_STRIDE].ravel().astype(np.float32)
    record = decoded.record.model_copy(update={"content_sha256": source.content_sha256, "pads": converted[0][1]})
    return ConvertedFile(record=record, images=images, hu_sample=hu_sample)


def _store_in_cache(converted: ConvertedFile, cache_file: Path) -> CachedFile:
    """Store one file's images, HU sample and record (or its rejection) in the private cache; returns what the
    assembly needs of it (no images)."""
    # The images' hash is taken here, in the decode worker, so that ordering the dataset needs no image in memory.
    digest = image_hash(converted.images)
    record_json = converted.record.model_dump_json()
    buffer = io.BytesIO()
    np.savez(buffer, images=converted.images, hu_sample=converted.hu_sample, record=np.array(record_json), image_sha256=np.array(digest))
    # No fsync: a cache entry lost in a crash is simply decoded again; the rename still keeps it whole.
    atomic_write_bytes(cache_file, buffer.getvalue(), durable=False, mode=PRIVATE_FILE_MODE)
    # The record as a later read of this entry gives it (same types), so a run's output does not depend on
    # whether a file was decoded now or earlier.
    return CachedFile(record=DecodedFileRecord.model_validate_json(record_json), image_sha256=digest, hu_sample=converted.hu_sample)


def decoding_marker(cache_file: Path) -> Path:
    """The file that exists while a process decodes into cache_file: left behind, it names the file whose decode
    killed its process."""
    return cache_file.with_suffix(".decoding")


def is_cached(source: SourceFile, cache_dir: str | Path) -> bool:
    """True when the file's decoded result (or its rejection) is in the cache."""
    return cache_path(Path(cache_dir), source.content_sha256).exists()


def was_being_decoded(source: SourceFile, cache_dir: str | Path) -> bool:
    """True when a process started decoding this file and died before storing its result."""
    cache_file = cache_path(Path(cache_dir), source.content_sha256)
    return decoding_marker(cache_file).exists() and not cache_file.exists()


@contextlib.contextmanager
def _writing_cache(cache_dir: str) -> Iterator[None]:
    """Turn an OSError that means 'no more bytes fit' into one sentence naming the cache folder (never retried)."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE_ERRNOS:
            raise
        raise OutputWriteError(f"cannot write decoded images into {cache_dir} ({error.strerror or error}).") from None


def decode_files(sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> dict[str, CachedFile]:
    """Validate and decode the files not yet in the content-addressed cache; returns those decoded now, by content
    hash (the others are read from the cache when needed). Each decode is bracketed by its decoding_marker, so a
    decode that kills the process is attributable to its file."""
    decoded = {}
    for source in sources:
        cache_file = cache_path(Path(cache_dir), source.content_sha256)
        if cache_file.exists():
            continue
        marker = decoding_marker(cache_file)
        with _writing_cache(cache_dir):
            make_private_dirs(marker.parent)
            marker.touch()
            decoded[source.content_sha256] = _store_in_cache(convert_file(source, size, window), cache_file)
            marker.unlink(missing_ok=True)
    return decoded


def store_decoder_crash(source: SourceFile, cache_dir: str, size: int, how: str) -> CachedFile:
    """Quarantine a file whose decode killed the process decoding it alone (`how`: the signal or exit code), in the
    cache like any rejection, so that later runs never decode it again."""
    message = f"{source.relative_path}: decoding it killed its process ({how}), also when decoded alone"
    rejected = _rejected_file(source, size, QuarantineReason.DECODER_CRASHED, message)
    cache_file = cache_path(Path(cache_dir), source.content_sha256)
    with _writing_cache(cache_dir):
        entry = _store_in_cache(rejected, cache_file)
    decoding_marker(cache_file).unlink(missing_ok=True)
    return entry


def _retry_unless_output_unwritable(task: object, task_run: object, state: State) -> bool:
    """Retry a failed chunk, except when the output folder cannot be written: retrying cannot help then."""
    try:
        state.result()
    except OutputWriteError:
        return False
    except Exception:
        return True
    return True


def chunk_cache_key(context: object, parameters: dict) -> str:
    """Prefect cache key of a chunk: its files' content hashes, the recipe and the cache location (no paths)."""
    return sha256_json({
        "files": sorted(source.content_sha256 for source in parameters["sources"]),
        "cache_dir": parameters["cache_dir"],
        "size": parameters["size"],
        "window": parameters["window"].model_dump(),
        "version": PREPROCESS_VERSION,
    })


@task(name="decode-chunk", retries=2, retry_delay_seconds=2, task_run_name="decode-chunk-{chunk_index}",
      cache_key_fn=chunk_cache_key, persist_result=True, retry_condition_fn=_retry_unless_output_unwritable)
def decode_chunk(chunk_index: int, sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> list[str]:
    """Decode one chunk of files into the dataset's private cache; the result holds only content hashes."""
    pool = current_decode_pool()
    if pool is not None:  # run by a thread of the flow's process: the local decode pool does the work
        pool.decode(sources, cache_dir, size, window)
    else:  # a Dask worker process: parallelism comes from the workers; each decode in a child of this process
        decode_in_children(sources, cache_dir, size, window)
    return [source.content_sha256 for source in sources]


def chunk_sources(sources: list[SourceFile], workers: int, max_chunk: int = 64) -> list[list[SourceFile]]:
    """Split files into chunks: at least 4 per worker for balance, at most max_chunk files each."""
    if not sources:
        return []
    n_chunks = max(workers * 4, -(-len(sources) // max_chunk))
    n_chunks = min(n_chunks, len(sources))
    return [sources[i::n_chunks] for i in range(n_chunks)]


def chunk_is_cached_on_disk(sources: list[SourceFile], cache_dir: Path) -> bool:
    """True when every file of the chunk has its decoded result in the cache (a Prefect cache hit is trusted only then)."""
    return all(cache_path(cache_dir, source.content_sha256).exists() for source in sources)


def image_hash(images: np.ndarray) -> str:
    """A file's image hash: the SHA-256 of its converted float16 images (its content key when ordering)."""
    return hashlib.sha256(images.tobytes()).hexdigest()


@dataclass
class CachedFile:
    """A decoded file as the assembly needs it, read from the cache without its images.

    Args:
        record: the file's record, with its current relative path.
        image_sha256: image_hash of its converted images.
        hu_sample: its HU sample (for the dataset's fingerprint).
    """

    record: DecodedFileRecord
    image_sha256: str
    hu_sample: np.ndarray


def hu_values_per_file(n_files: int) -> int:
    """How many of each file's HU sample values the fingerprint keeps: HU_SAMPLE_BUDGET shared by n_files."""
    return max(1, HU_SAMPLE_BUDGET // max(n_files, 1))


def thin_hu_sample(sample: np.ndarray, keep: int) -> np.ndarray:
    """At most `keep` values of a file's HU sample, evenly strided (deterministic); a copy, so the file's whole
    sample is not held by a view."""
    if sample.size <= keep:
        return sample
    return sample[:: -(-sample.size // keep)].copy()


def _read_cache_entry(cache_file: Path) -> CachedFile:
    """A cache entry's record, image hash and HU sample (its images stay on disk)."""
    with np.load(cache_file) as cached:
        record = DecodedFileRecord.model_validate_json(str(cached["record"]))
        # Entries written before the hash was cached get it from their images.
        digest = str(cached["image_sha256"]) if "image_sha256" in cached.files else image_hash(cached["images"])
        return CachedFile(record=record, image_sha256=digest, hu_sample=cached["hu_sample"])


def load_cached_files(sources: list[SourceFile], cache_dir: Path, hu_values: int | None = None) -> list[CachedFile]:
    """Each file's record, image hash and HU sample, with its current relative path: handed over by this process's
    decode pool when it decoded the file during this run (no re-read), else read from the cache.

    hu_values: keep at most this many of each file's HU sample values (hu_values_per_file of the archive's file
    count); None keeps them all.
    """
    pool = current_decode_pool()
    files = []
    for source in sources:
        entry = pool.take_decoded(source.content_sha256) if pool is not None else None
        if entry is None:  # decoded before this run, on Dask, or a second file with the same content
            entry = _read_cache_entry(cache_path(cache_dir, source.content_sha256))
        hu_sample = entry.hu_sample if hu_values is None else thin_hu_sample(entry.hu_sample, hu_values)
        record = entry.record.model_copy(update={
            "relative_path": source.relative_path,
            "message": entry.record.message.replace(entry.record.relative_path, source.relative_path, 1),
        })
        files.append(CachedFile(record=record, image_sha256=entry.image_sha256, hu_sample=hu_sample))
    return files


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
            raise IngestError(f"labels file {path.name} has no '{LABEL_COLUMN}' column (columns found: {', '.join(columns) or 'none'}).")
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


def mark_duplicates(records: list[DecodedFileRecord]) -> list[DecodedFileRecord]:
    """Quarantine every accepted file whose SOP Instance UID an earlier path (in path order) already has."""
    kept: dict[str, str] = {}
    result = []
    for record in sorted(records, key=lambda r: r.relative_path):
        if record.accepted:
            uid = record.sop_instance_uid or f"sha:{record.content_sha256}"
            if uid in kept:
                record = record.model_copy(update={
                    "accepted": False,
                    "reason": QuarantineReason.DUPLICATE_SOP_INSTANCE,
                    "message": f"{record.relative_path}: same SOP Instance UID as {kept[uid]}, which was kept",
                })
            else:
                kept[uid] = record.relative_path
        result.append(record)
    return result


def summarize(values: list[float] | np.ndarray) -> NumericSummary:
    """Count, range, 5/50/95th percentiles, mean and standard deviation of the non-missing values."""
    if isinstance(values, np.ndarray):
        array = values.astype(np.float64, copy=False).ravel()
    else:
        array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return NumericSummary(count=0)
    p05, median, p95 = np.percentile(array, [5, 50, 95])
    return NumericSummary(
        count=int(array.size), min=float(array.min()), p05=float(p05), median=float(median), p95=float(p95),
        max=float(array.max()), mean=float(array.mean()), std=float(array.std()),
    )


def _package_version() -> str:
    try:
        return version("ctcompare")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class IngestResult:
    """What an ingest run produced: the dataset card and where the private files are."""

    card: DatasetCard
    out_dir: Path
    skipped: bool
    quarantine: list[QuarantineRow]


def _input_signature(
    records: list[DecodedFileRecord], discovery_rejects: list[QuarantineRow], settings: dict[str, object], labels: LabelTable | None
) -> str:
    return sha256_json({
        "files": [(r.relative_path, r.content_sha256, r.accepted) for r in records],
        "rejects": [(q.relative_path, q.reason.value) for q in discovery_rejects],
        "settings": settings,
        "labels": None if labels is None else {"key": labels.key_column, "labels": sorted(labels.labels.items())},
    })


def apply_burned_in_policy(records: list[DecodedFileRecord], allow_burned_in: bool) -> list[DecodedFileRecord]:
    """Quarantine files whose pixels may carry text (BurnedInAnnotation YES, Secondary Capture) unless allowed."""
    if allow_burned_in:
        return records
    result = []
    for record in records:
        if record.accepted and record.burned_in_annotation:
            record = record.model_copy(update={
                "accepted": False, "reason": QuarantineReason.BURNED_IN_ANNOTATION,
                "message": f"{record.relative_path}: header says BurnedInAnnotation YES (text in the pixels); use --allow-burned-in to include it knowingly",
            })
        elif record.accepted and record.secondary_capture:
            record = record.model_copy(update={
                "accepted": False, "reason": QuarantineReason.SECONDARY_CAPTURE,
                "message": f"{record.relative_path}: Secondary Capture object (may show burned-in text); use --allow-burned-in to include it knowingly",
            })
        result.append(record)
    return result


def _patient_identity(record: DecodedFileRecord) -> str:
    return record.patient_id or f"study:{record.study_instance_uid}"


def order_by_content(files: list[CachedFile]) -> list[CachedFile]:
    """Order the accepted files by content alone, whatever the pseudonymization key (no image is loaded).

    Files are grouped by patient, study and series; each group is ordered by a content key, the SHA-256 of the
    sorted image hashes of its files (an image hash is the SHA-256 of the file's converted float16 images), then
    by instance number, image hash and file hash. No identifier and no HMAC key decides the order.
    """
    identities = {
        "patient": lambda r: (_patient_identity(r),),
        "study": lambda r: (_patient_identity(r), r.study_instance_uid),
        "series": lambda r: (_patient_identity(r), r.study_instance_uid, r.series_instance_uid),
    }
    content_keys: dict[str, dict[tuple[str, ...], str]] = {}
    for level, identity in identities.items():
        groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for item in files:
            groups[identity(item.record)].append(item.image_sha256)
        content_keys[level] = {group: sha256_json(sorted(hashes)) for group, hashes in groups.items()}
    return sorted(files, key=lambda item: (
        *(content_keys[level][identity(item.record)] for level, identity in identities.items()),
        item.record.instance_number or 0, item.image_sha256, item.record.content_sha256,
    ))


@dataclass
class DatasetRows:
    """What the ordered files become: the manifest, the private index, the files whose images fill images.npy (in
    order), their HU samples and the unlabelled paths."""

    manifest: list[ManifestRow] = field(default_factory=list)
    index: list[PrivateIndexRow] = field(default_factory=list)
    image_files: list[DecodedFileRecord] = field(default_factory=list)
    hu_samples: list[np.ndarray] = field(default_factory=list)
    unlabeled_paths: list[str] = field(default_factory=list)
    label_hits: int = 0


def build_rows(ordered: list[CachedFile], secret: bytes, labels: LabelTable | None) -> DatasetRows:
    """Pseudonymize and label the ordered files: one manifest row (and private index row) per frame."""
    rows = DatasetRows()
    for item in ordered:
        record = item.record
        patient_key = pseudonym(secret, "patient", _patient_identity(record))
        study_key = pseudonym(secret, "study", record.study_instance_uid)
        series_key = pseudonym(secret, "series", record.series_instance_uid)
        sop_key = pseudonym(secret, "image", record.sop_instance_uid or record.content_sha256)
        label = ""
        if labels is not None:
            label = labels.labels.get(label_key(record, labels.key_column), "")
            if label:
                rows.label_hits += 1
            else:
                rows.unlabeled_paths.append(record.relative_path)
        pad_top, pad_bottom, pad_left, pad_right = record.pads
        for frame_number in range(record.n_frames):
            image_key = pseudonym(secret, "frame", f"{sop_key}/{frame_number}") if record.n_frames > 1 else sop_key
            rows.manifest.append(ManifestRow(
                index=len(rows.manifest), image_key=image_key, patient_key=patient_key, study_key=study_key,
                series_key=series_key, frame=frame_number, label=label, rows=record.rows, columns=record.columns,
                pixel_spacing_mm=record.pixel_spacing_mm, slice_thickness_mm=record.slice_thickness_mm,
                manufacturer=record.manufacturer, model_name=record.model_name, kvp=record.kvp,
                transfer_syntax=record.transfer_syntax, photometric_interpretation=record.photometric_interpretation,
                pad_top=pad_top, pad_bottom=pad_bottom, pad_left=pad_left, pad_right=pad_right,
            ))
            rows.index.append(PrivateIndexRow(image_key=image_key, relative_path=record.relative_path, content_sha256=record.content_sha256, frame=frame_number))
        rows.image_files.append(record)
        rows.hu_samples.append(item.hu_sample)
    return rows


def cached_image_blocks(records: list[DecodedFileRecord], cache_dir: Path, size: int) -> ImageBlocks:
    """images.npy's rows, streamed from the cache one file at a time in the given order (one file in memory)."""

    def blocks() -> Iterator[np.ndarray]:
        for record in records:
            with np.load(cache_path(cache_dir, record.content_sha256)) as cached:
                images = cached["images"]
            if images.shape[0] != record.n_frames:
                raise ValueError(f"cached images of {record.relative_path} have {images.shape[0]} frame(s), its record {record.n_frames}")
            yield images[:, None]

    return ImageBlocks(shape=(sum(r.n_frames for r in records), 1, size, size), blocks=blocks)


def build_card(rows: DatasetRows, *, size: int, window: WindowSpec, labels: LabelTable | None, n_files_seen: int, n_accepted: int, quarantine: list[QuarantineRow]) -> DatasetCard:
    """The dataset card (content_hash left empty: write_dataset fills it from the files it writes)."""
    manifest = rows.manifest
    level, width = window_level_width(window)
    fingerprint = DatasetFingerprint(
        matrix_sizes=dict(sorted(Counter(f"{r.rows}x{r.columns}" for r in manifest).items())),
        pixel_spacing_mm=summarize([r.pixel_spacing_mm for r in manifest]),
        slice_thickness_mm=summarize([r.slice_thickness_mm for r in manifest]),
        # Straight into float64 (what summarize computes in): no float32 copy of every sample beside it.
        hounsfield_units=summarize(np.concatenate(rows.hu_samples, dtype=np.float64)),
        manufacturers=dict(sorted(Counter(r.manufacturer or "unknown" for r in manifest).items())),
        transfer_syntaxes=dict(sorted(Counter(r.transfer_syntax or "unknown" for r in manifest).items())),
        kvp=summarize([r.kvp for r in manifest]),
    )
    return DatasetCard(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ctcompare_version=_package_version(),
        image_size=size,
        value_mapping=(
            f"v = clip((HU - ({level:g} - {width:g}/2)) / {width:g}, 0, 1) after the modality LUT "
            "(Rescale Slope/Intercept); MONOCHROME1 stored as 1 - v"
        ),
        window=window,
        interpolation="bicubic, antialiased (torch.nn.functional.interpolate), clipped to [0, 1]",
        padding="zero-padded (the bottom of the window) to a centred square before resizing; per image in manifest.csv",
        n_images=len(manifest),
        n_patients=len({r.patient_key for r in manifest}),
        n_studies=len({r.study_key for r in manifest}),
        n_series=len({r.series_key for r in manifest}),
        n_files_seen=n_files_seen,
        n_files_ingested=n_accepted,
        n_files_quarantined=len(quarantine),
        quarantine_reasons=dict(sorted(Counter(q.reason.value for q in quarantine).items())),
        labels_source=None if labels is None else labels.key_column,
        label_distribution=dict(sorted(Counter(row.label for row in manifest if row.label).items())),
        n_unlabeled_images=sum(1 for r in manifest if not r.label),
        fingerprint=fingerprint,
        content_hash="",
    )


@contextlib.contextmanager
def _writing_into(folder: Path) -> Iterator[None]:
    """Turn an OSError while writing (disk full, read-only, no permission) into one sentence naming the folder."""
    try:
        yield
    except OSError as error:
        if error.errno not in UNWRITABLE_ERRNOS:
            raise
        raise OutputWriteError(f"cannot write the dataset into {folder} ({error.strerror or error}).") from None


def _unchanged_dataset(out_dir: Path, signature: str) -> IngestResult | None:
    """The existing dataset when it was built from the same inputs and its files still match its card."""
    state_path, card_path = out_dir / INGEST_STATE_FILE, out_dir / DATASET_CARD_FILE
    if not (state_path.is_file() and card_path.is_file() and (out_dir / IMAGES_FILE).is_file() and (out_dir / MANIFEST_FILE).is_file()):
        return None
    state = json.loads(state_path.read_text())
    card = DatasetCard.model_validate_json(card_path.read_text())
    if state.get("signature") != signature or state.get("content_hash") != card.content_hash:
        return None
    if dataset_content_hash(out_dir / IMAGES_FILE, out_dir / MANIFEST_FILE) != card.content_hash:
        return None
    return IngestResult(card=card, out_dir=out_dir, skipped=True, quarantine=read_models_csv(out_dir / QUARANTINE_FILE, QuarantineRow))


def _write_private_files(out_dir: Path, quarantine: list[QuarantineRow], rows: DatasetRows | None) -> None:
    """The private part: quarantine list, index and unlabelled list, owner-only; the old shared quarantine.csv goes."""
    write_models_csv(out_dir / QUARANTINE_FILE, quarantine, QuarantineRow, mode=PRIVATE_FILE_MODE)
    (out_dir / LEGACY_QUARANTINE_FILE).unlink(missing_ok=True)  # source paths never stay where shared files go
    if rows is not None:
        write_models_csv(out_dir / PRIVATE_INDEX_FILE, rows.index, PrivateIndexRow, mode=PRIVATE_FILE_MODE)
        unlabeled = "relative_path\n" + "".join(f"{p}\n" for p in sorted(rows.unlabeled_paths))
        atomic_write_text(out_dir / UNLABELED_FILE, unlabeled, mode=PRIVATE_FILE_MODE)


def assemble_dataset(
    files: list[CachedFile],
    discovery_rejects: list[QuarantineRow],
    out_dir: Path,
    cache_dir: Path,
    size: int,
    window: WindowSpec,
    labels: LabelTable | None,
    *,
    allow_burned_in: bool = False,
) -> IngestResult:
    """Under the dataset folder's write lock: pseudonymize, order by content, label, fingerprint and write the folder.

    `files` (load_cached_files) carry no images: images.npy is streamed from the cache one file at a time, in the
    final order, so memory does not grow with the number of images. A second run into the same folder waits up to DATASET_LOCK_TIMEOUT_S for the first, then refuses with one
    sentence; an unwritable folder (disk full, read-only) also gives one sentence naming it.
    """
    try:
        with _writing_into(out_dir), dataset_write_lock(out_dir, DATASET_LOCK_TIMEOUT_S):
            return _assemble_locked(files, discovery_rejects, out_dir, cache_dir, size, window, labels, allow_burned_in)
    except DatasetBusyError as error:
        raise OutputWriteError(str(error)) from None


def _assemble_locked(
    files: list[CachedFile], discovery_rejects: list[QuarantineRow], out_dir: Path, cache_dir: Path,
    size: int, window: WindowSpec, labels: LabelTable | None, allow_burned_in: bool,
) -> IngestResult:
    """assemble_dataset's work, with the lock held."""
    settings = {"recipe": preprocessing_signature(size, window), "allow_burned_in": allow_burned_in}
    records = [item.record for item in files]
    signature = _input_signature(records, discovery_rejects, settings, labels)
    unchanged = _unchanged_dataset(out_dir, signature)
    if unchanged is not None:
        return unchanged

    records = mark_duplicates(apply_burned_in_policy(records, allow_burned_in))
    by_path = {item.record.relative_path: item for item in files}
    accepted = [CachedFile(r, by_path[r.relative_path].image_sha256, by_path[r.relative_path].hu_sample) for r in records if r.accepted]
    quarantine = sorted(
        discovery_rejects + [QuarantineRow(relative_path=r.relative_path, reason=r.reason or QuarantineReason.DECODE_ERROR, message=r.message) for r in records if not r.accepted],
        key=lambda q: q.relative_path,
    )
    n_files_seen = len(records) + len(discovery_rejects)
    if not accepted:
        _write_private_files(out_dir, quarantine, None)
        raise IngestError(f"no CT image could be ingested from {n_files_seen} file(s); see {out_dir / QUARANTINE_FILE} for the reason of each.")

    rows = build_rows(order_by_content(accepted), load_or_create_secret(out_dir / PRIVATE_DIR), labels)
    if labels is not None and rows.label_hits == 0:
        raise IngestError(
            f"no {labels.key_column} in labels file {labels.source_name} matches any of the {len(accepted)} ingested file(s); "
            "check that the key column holds the values stored in the DICOM headers."
        )
    card = build_card(rows, size=size, window=window, labels=labels, n_files_seen=n_files_seen, n_accepted=len(accepted), quarantine=quarantine)
    # Private files first, the shareable dataset last (dataset.json marks completion), then the state.
    _write_private_files(out_dir, quarantine, rows)
    card = write_dataset(out_dir, cached_image_blocks(rows.image_files, cache_dir, size), rows.manifest, card)
    atomic_write_text(out_dir / INGEST_STATE_FILE, json.dumps({"signature": signature, "content_hash": card.content_hash}) + "\n", mode=PRIVATE_FILE_MODE)
    return IngestResult(card=card, out_dir=out_dir, skipped=False, quarantine=quarantine)
