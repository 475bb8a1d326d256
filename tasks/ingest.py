"""Ingest: a folder of DICOM files -> a pseudonymized tensor dataset (see data_schemas.dataset for the files).

Work is split in chunks of files; each chunk is one Prefect task run by the flow's task runner (processes
locally, or a Dask cluster). Each file's result is cached under private/cache by content hash and
preprocessing settings, so a re-run decodes only new or changed files and assembles the same dataset.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from prefect import task

from data_schemas.dataset import (
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
from tasks.dataset_store import write_dataset
from tasks.decode_pool import current_decode_pool, limit_compute_threads
from tasks.dicom_io import Rejected, read_ct_file
from data_schemas.files import atomic_write_bytes, atomic_write_text, read_models_csv, sha256_file, sha256_json, write_models_csv
from tasks.preprocess import hu_frame_to_image, window_level_width
from tasks.pseudonymize import load_or_create_secret, pseudonym

# Bump when the conversion recipe changes: it invalidates every cached decode.
PREPROCESS_VERSION = 1
HU_SAMPLE_STRIDE = 8
INGEST_STATE_FILE = "private/ingest_state.json"


class IngestError(ValueError):
    """Ingest cannot go on (bad labels file, nothing ingested): one sentence for the user."""


@dataclass(frozen=True)
class SourceFile:
    """A discovered file: absolute path, path relative to the source folder (POSIX) and content hash."""

    path: str
    relative_path: str
    content_sha256: str


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def discover_files(src_dir: Path) -> tuple[list[SourceFile], list[QuarantineRow]]:
    """Walk src_dir recursively (following folder links once), whatever the extensions, and hash each file."""
    files: list[SourceFile] = []
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
            try:
                content_sha256 = sha256_file(path)
            except OSError as error:
                reject(relative, QuarantineReason.UNREADABLE, f"cannot be read ({error.strerror})")
                continue
            files.append(SourceFile(path=str(path), relative_path=relative, content_sha256=content_sha256))
    files.sort(key=lambda item: item.relative_path)
    return files, rejected


def preprocessing_signature(size: int, window: WindowSpec) -> str:
    """Identity of the conversion recipe; cached decodes are reused only under the same signature."""
    return sha256_json({"size": size, "window": window.model_dump(), "version": PREPROCESS_VERSION})[:16]


def cache_path(cache_dir: Path, content_sha256: str) -> Path:
    """Where one file's decoded result lives: private/cache/<recipe>/<sha[:2]>/<sha>.npz."""
    return Path(cache_dir) / content_sha256[:2] / f"{content_sha256}.npz"


def _decode_to_cache(source: SourceFile, cache_file: Path, size: int, window: WindowSpec) -> None:
    """Decode one file and store its images, HU sample and record (or its rejection) in the cache."""
    try:
        decoded = read_ct_file(Path(source.path), source.relative_path)
    except Rejected as rejected:
        record = DecodedFileRecord(relative_path=source.relative_path, content_sha256=source.content_sha256, accepted=False, reason=rejected.reason, message=rejected.message)
        images = np.zeros((0, size, size), np.float16)
        hu_sample = np.zeros(0, np.float32)
    else:
        monochrome1 = decoded.record.photometric_interpretation == "MONOCHROME1"
        converted = [hu_frame_to_image(frame, window, size, monochrome1) for frame in decoded.hu_frames]
        images = np.stack([image for image, _ in converted]).astype(np.float16)
        hu_sample = decoded.hu_frames[:, ::HU_SAMPLE_STRIDE, ::HU_SAMPLE_STRIDE].ravel().astype(np.float32)
        record = decoded.record.model_copy(update={"content_sha256": source.content_sha256, "pads": converted[0][1]})
    buffer = io.BytesIO()
    np.savez(buffer, images=images, hu_sample=hu_sample, record=np.array(record.model_dump_json()))
    # No fsync: a cache entry lost in a crash is simply decoded again; the rename still keeps it whole.
    atomic_write_bytes(cache_file, buffer.getvalue(), durable=False)


def decode_files(sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> list[str]:
    """Validate and decode the files not yet in the content-addressed cache; returns the hashes covered."""
    for source in sources:
        cache_file = cache_path(Path(cache_dir), source.content_sha256)
        if not cache_file.exists():
            _decode_to_cache(source, cache_file, size, window)
    return [source.content_sha256 for source in sources]


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
      cache_key_fn=chunk_cache_key, persist_result=True)
def decode_chunk(chunk_index: int, sources: list[SourceFile], cache_dir: str, size: int, window: WindowSpec) -> list[str]:
    """Decode one chunk of files into the dataset's private cache; the result holds only content hashes."""
    pool = current_decode_pool()
    if pool is not None:  # run by a thread of the flow's process: the local decode pool does the work
        return pool.decode(sources, cache_dir, size, window)
    limit_compute_threads()  # a Dask worker process: parallelism comes from the workers
    return decode_files(sources, cache_dir, size, window)


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


def load_cached_records(sources: list[SourceFile], cache_dir: Path) -> list[DecodedFileRecord]:
    """Read each file's record from the cache, with its current relative path."""
    records = []
    for source in sources:
        with np.load(cache_path(cache_dir, source.content_sha256)) as cached:
            record = DecodedFileRecord.model_validate_json(str(cached["record"]))
        records.append(record.model_copy(update={"relative_path": source.relative_path, "message": record.message.replace(record.relative_path, source.relative_path, 1)}))
    return records


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


def _label_key(record: DecodedFileRecord, key_column: str) -> str:
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


def _input_signature(records: list[DecodedFileRecord], discovery_rejects: list[QuarantineRow], settings_sig: str, labels: LabelTable | None) -> str:
    return sha256_json({
        "files": [(r.relative_path, r.content_sha256, r.accepted) for r in records],
        "rejects": [(q.relative_path, q.reason.value) for q in discovery_rejects],
        "settings": settings_sig,
        "labels": None if labels is None else {"key": labels.key_column, "labels": sorted(labels.labels.items())},
    })


def assemble_dataset(
    records: list[DecodedFileRecord],
    discovery_rejects: list[QuarantineRow],
    out_dir: Path,
    cache_dir: Path,
    size: int,
    window: WindowSpec,
    labels: LabelTable | None,
) -> IngestResult:
    """Pseudonymize, order deterministically, label, fingerprint and write the dataset folder."""
    private_dir = out_dir / PRIVATE_DIR
    signature = _input_signature(records, discovery_rejects, preprocessing_signature(size, window), labels)
    state_path = out_dir / INGEST_STATE_FILE
    card_path = out_dir / "dataset.json"
    if state_path.is_file() and card_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("signature") == signature:
            card = DatasetCard.model_validate_json(card_path.read_text())
            return IngestResult(card=card, out_dir=out_dir, skipped=True, quarantine=read_models_csv(out_dir / QUARANTINE_FILE, QuarantineRow))

    records = mark_duplicates(records)
    accepted = [r for r in records if r.accepted]
    quarantine = sorted(
        discovery_rejects + [QuarantineRow(relative_path=r.relative_path, reason=r.reason or QuarantineReason.DECODE_ERROR, message=r.message) for r in records if not r.accepted],
        key=lambda q: q.relative_path,
    )
    n_files_seen = len(records) + len(discovery_rejects)
    if not accepted:
        write_models_csv(out_dir / QUARANTINE_FILE, quarantine, QuarantineRow)
        raise IngestError(f"no CT image could be ingested from {n_files_seen} file(s); see {out_dir / QUARANTINE_FILE} for the reason of each.")

    secret = load_or_create_secret(private_dir)
    keyed = []
    for record in accepted:
        patient_key = pseudonym(secret, "patient", record.patient_id or f"study:{record.study_instance_uid}")
        study_key = pseudonym(secret, "study", record.study_instance_uid)
        series_key = pseudonym(secret, "series", record.series_instance_uid)
        sop_key = pseudonym(secret, "image", record.sop_instance_uid or record.content_sha256)
        keyed.append((patient_key, study_key, series_key, record.instance_number or 0, sop_key, record))
    keyed.sort(key=lambda item: item[:5])

    label_hits = 0
    manifest: list[ManifestRow] = []
    index_rows: list[PrivateIndexRow] = []
    unlabeled_paths: list[str] = []
    image_blocks: list[np.ndarray] = []
    hu_samples: list[np.ndarray] = []
    for patient_key, study_key, series_key, _, sop_key, record in keyed:
        with np.load(cache_path(cache_dir, record.content_sha256)) as cached:
            frames = cached["images"]
            hu_samples.append(cached["hu_sample"])
        label = ""
        if labels is not None:
            label = labels.labels.get(_label_key(record, labels.key_column), "")
            if label:
                label_hits += 1
            else:
                unlabeled_paths.append(record.relative_path)
        pad_top, pad_bottom, pad_left, pad_right = record.pads
        for frame_number in range(frames.shape[0]):
            image_key = pseudonym(secret, "frame", f"{sop_key}/{frame_number}") if frames.shape[0] > 1 else sop_key
            manifest.append(ManifestRow(
                index=len(manifest), image_key=image_key, patient_key=patient_key, study_key=study_key,
                series_key=series_key, frame=frame_number, label=label, rows=record.rows, columns=record.columns,
                pixel_spacing_mm=record.pixel_spacing_mm, slice_thickness_mm=record.slice_thickness_mm,
                manufacturer=record.manufacturer, model_name=record.model_name, kvp=record.kvp,
                transfer_syntax=record.transfer_syntax, photometric_interpretation=record.photometric_interpretation,
                pad_top=pad_top, pad_bottom=pad_bottom, pad_left=pad_left, pad_right=pad_right,
            ))
            index_rows.append(PrivateIndexRow(image_key=image_key, relative_path=record.relative_path, content_sha256=record.content_sha256, frame=frame_number))
        image_blocks.append(frames)
    if labels is not None and label_hits == 0:
        raise IngestError(
            f"no {labels.key_column} in labels file {labels.source_name} matches any of the {len(accepted)} ingested file(s); "
            "check that the key column holds the values stored in the DICOM headers."
        )

    images = np.concatenate(image_blocks)[:, None]
    label_counts = Counter(row.label for row in manifest if row.label)
    level, width = window_level_width(window)
    fingerprint = DatasetFingerprint(
        matrix_sizes=dict(sorted(Counter(f"{r.rows}x{r.columns}" for r in manifest).items())),
        pixel_spacing_mm=summarize([r.pixel_spacing_mm for r in manifest]),
        slice_thickness_mm=summarize([r.slice_thickness_mm for r in manifest]),
        hounsfield_units=summarize(np.concatenate(hu_samples)),
        manufacturers=dict(sorted(Counter(r.manufacturer or "unknown" for r in manifest).items())),
        transfer_syntaxes=dict(sorted(Counter(r.transfer_syntax or "unknown" for r in manifest).items())),
        kvp=summarize([r.kvp for r in manifest]),
    )
    card = DatasetCard(
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
        n_files_ingested=len(accepted),
        n_files_quarantined=len(quarantine),
        quarantine_reasons=dict(sorted(Counter(q.reason.value for q in quarantine).items())),
        labels_source=None if labels is None else labels.key_column,
        label_distribution=dict(sorted(label_counts.items())),
        n_unlabeled_images=sum(1 for r in manifest if not r.label),
        fingerprint=fingerprint,
        content_hash="",
    )
    # Private files first, the shareable dataset last (dataset.json marks completion), then the state.
    write_models_csv(out_dir / QUARANTINE_FILE, quarantine, QuarantineRow)
    write_models_csv(out_dir / PRIVATE_INDEX_FILE, index_rows, PrivateIndexRow)
    atomic_write_text(out_dir / UNLABELED_FILE, "relative_path\n" + "".join(f"{p}\n" for p in sorted(unlabeled_paths)))
    card = write_dataset(out_dir, images, manifest, card)
    atomic_write_text(state_path, json.dumps({"signature": signature, "content_hash": card.content_hash}) + "\n")
    return IngestResult(card=card, out_dir=out_dir, skipped=False, quarantine=quarantine)
