"""Assembly: the decoded files -> a pseudonymized tensor dataset (see data_schemas.dataset for the files).

Assembly runs under the dataset folder's write lock, marks duplicates and burned-in files, orders rows by content
(never by pseudonym), labels and fingerprints them, and writes the dataset folder; a dataset built from the same
inputs is kept as it is.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
from data_schemas.files import atomic_write_text, read_models_csv, sha256_json, write_models_csv
from tasks.common.environment import ctcompare_version, utc_now
from tasks.ingest.dataset_store import (
    PRIVATE_FILE_MODE,
    DatasetBusyError,
    ImageBlocks,
    dataset_content_hash,
    dataset_write_lock,
    write_dataset,
)
from tasks.ingest.decode import CachedFile, cache_path, preprocessing_signature
from tasks.ingest.errors import IngestError, OutputWriteError, writing_into
from tasks.ingest.labels import LabelTable, label_key
from tasks.ingest.preprocess import window_level_width
from tasks.ingest.pseudonymize import load_or_create_secret, pseudonym

INGEST_STATE_FILE = "private/ingest_state.json"
# How long a second ingest into the same dataset folder waits for the first to finish writing.
DATASET_LOCK_TIMEOUT_S = 600.0


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


@dataclass
class IngestResult:
    """What an ingest run produced: the dataset card and where the private files are."""

    card: DatasetCard
    out_dir: Path
    skipped: bool
    quarantine: list[QuarantineRow]


def _input_signature(
    records: list[DecodedFileRecord],
    discovery_rejects: list[QuarantineRow],
    settings: dict[str, object],
    labels: LabelTable | None,
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
                "message": f"{record.relative_path}: header says BurnedInAnnotation YES (text in the pixels); use "
                           "--allow-burned-in to include it knowingly",
            })
        elif record.accepted and record.secondary_capture:
            record = record.model_copy(update={
                "accepted": False, "reason": QuarantineReason.SECONDARY_CAPTURE,
                "message": f"{record.relative_path}: Secondary Capture object (may show burned-in text); use "
                           "--allow-burned-in to include it knowingly",
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
            rows.index.append(
                PrivateIndexRow(
                    image_key=image_key,
                    relative_path=record.relative_path,
                    content_sha256=record.content_sha256,
                    frame=frame_number,
                )
            )
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
                raise ValueError(f"cached images of {record.relative_path} have {images.shape[0]} frame(s), its record "
                                 f"{record.n_frames}")
            yield images[:, None]

    return ImageBlocks(shape=(sum(r.n_frames for r in records), 1, size, size), blocks=blocks)


def build_card(
    rows: DatasetRows,
    *,
    size: int,
    window: WindowSpec,
    labels: LabelTable | None,
    n_files_seen: int,
    n_accepted: int,
    quarantine: list[QuarantineRow],
) -> DatasetCard:
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
        created_at=utc_now(),
        ctcompare_version=ctcompare_version(),
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


def _unchanged_dataset(out_dir: Path, signature: str) -> IngestResult | None:
    """The existing dataset when it was built from the same inputs and its files still match its card."""
    state_path, card_path = out_dir / INGEST_STATE_FILE, out_dir / DATASET_CARD_FILE
    if not (
        state_path.is_file()
        and card_path.is_file()
        and (out_dir / IMAGES_FILE).is_file()
        and (out_dir / MANIFEST_FILE).is_file()
    ):
        return None
    state = json.loads(state_path.read_text())
    card = DatasetCard.model_validate_json(card_path.read_text())
    if state.get("signature") != signature or state.get("content_hash") != card.content_hash:
        return None
    if dataset_content_hash(out_dir / IMAGES_FILE, out_dir / MANIFEST_FILE) != card.content_hash:
        return None
    return IngestResult(
        card=card, out_dir=out_dir, skipped=True, quarantine=read_models_csv(out_dir / QUARANTINE_FILE, QuarantineRow)
    )


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
    final order, so memory does not grow with the number of images. A second run into the same folder waits up to
    DATASET_LOCK_TIMEOUT_S for the first, then refuses with one
    sentence; an unwritable folder (disk full, read-only) also gives one sentence naming it.
    """
    try:
        with writing_into(out_dir, "the dataset"), dataset_write_lock(out_dir, DATASET_LOCK_TIMEOUT_S):
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
    accepted, quarantine = _accepted_and_quarantined(files, records, discovery_rejects)
    n_files_seen = len(records) + len(discovery_rejects)
    if not accepted:
        _write_private_files(out_dir, quarantine, None)
        raise IngestError(f"no CT image could be ingested from {n_files_seen} file(s); see {out_dir / QUARANTINE_FILE} "
                          "for the reason of each.")

    rows = build_rows(order_by_content(accepted), load_or_create_secret(out_dir / PRIVATE_DIR), labels)
    if labels is not None and rows.label_hits == 0:
        raise IngestError(
            f"no {labels.key_column} in labels file {labels.source_name} matches any of the {len(accepted)} ingested "
            "file(s); "
            "check that the key column holds the values stored in the DICOM headers."
        )
    card = build_card(
        rows,
        size=size,
        window=window,
        labels=labels,
        n_files_seen=n_files_seen,
        n_accepted=len(accepted),
        quarantine=quarantine,
    )
    # Private files first, the shareable dataset last (dataset.json marks completion), then the state.
    _write_private_files(out_dir, quarantine, rows)
    card = write_dataset(out_dir, cached_image_blocks(rows.image_files, cache_dir, size), rows.manifest, card)
    atomic_write_text(
        out_dir / INGEST_STATE_FILE,
        json.dumps({"signature": signature, "content_hash": card.content_hash}) + "\n",
        mode=PRIVATE_FILE_MODE,
    )
    return IngestResult(card=card, out_dir=out_dir, skipped=False, quarantine=quarantine)


def _accepted_and_quarantined(
    files: list[CachedFile], records: list[DecodedFileRecord], discovery_rejects: list[QuarantineRow]
) -> tuple[list[CachedFile], list[QuarantineRow]]:
    """The accepted files (with their cached image hash and HU sample), and every rejected one as a quarantine row
    (with discovery's rejects), by relative path."""
    by_path = {item.record.relative_path: item for item in files}
    accepted = [
        CachedFile(r, by_path[r.relative_path].image_sha256, by_path[r.relative_path].hu_sample)
        for r in records
        if r.accepted
    ]
    quarantine = sorted(
        discovery_rejects
        + [
            QuarantineRow(
                relative_path=r.relative_path, reason=r.reason or QuarantineReason.DECODE_ERROR, message=r.message
            )
            for r in records
            if not r.accepted
        ],
        key=lambda q: q.relative_path,
    )
    return accepted, quarantine
