"""Schemas of the files the ingest stage writes into a dataset folder.

Shareable part of a dataset folder (safe to hand to a colleague, built into reports):
    images.npy      float16 array (N, 1, S, S), values in [0, 1], row i <-> row i of manifest.csv
    manifest.csv    one ManifestRow per image, keys are HMAC-SHA256 pseudonyms
    dataset.json    DatasetCard: conversion recipe, counts, label distribution, fingerprint

Private part (never shared, never read by reports):
    private/index.csv       PrivateIndexRow: image key -> source path and content hash
    private/hmac.key        the pseudonymization secret (0600), unless CTCOMPARE_HMAC_KEY is set
    private/cache/          decoded per-file results keyed by content hash, for incremental re-ingest
    private/quarantine.csv  QuarantineRow per rejected file (paths may contain names); dataset.json keeps
                            only the count per reason
    private/write.lock      held by the one run writing the dataset folder

The private folder is 0700 and its files 0600, enforced on every ingest.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field

from data_schemas.base import StrictModel

DATASET_SCHEMA_VERSION = "1.0"

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.csv"
DATASET_CARD_FILE = "dataset.json"
PRIVATE_DIR = "private"
QUARANTINE_FILE = "private/quarantine.csv"
# Where datasets written before quarantine.csv moved under private/ kept it; removed by the next ingest.
LEGACY_QUARANTINE_FILE = "quarantine.csv"
DATASET_LOCK_FILE = "private/write.lock"
PRIVATE_INDEX_FILE = "private/index.csv"
UNLABELED_FILE = "private/unlabeled.csv"
CACHE_DIR = "private/cache"


class QuarantineReason(str, Enum):
    """Stable reason codes for files that did not become images."""

    NOT_DICOM = "not_dicom"
    EMPTY_FILE = "empty_file"
    TRUNCATED = "truncated"
    NO_PIXEL_DATA = "no_pixel_data"
    NOT_CT = "not_ct"
    NOT_GRAYSCALE = "not_grayscale"
    NO_DECODER = "no_decoder"
    PIXEL_DATA_SHORT = "pixel_data_short"
    ABSURD_SIZE = "absurd_size"
    DUPLICATE_SOP_INSTANCE = "duplicate_sop_instance"
    UNREADABLE = "unreadable"
    SYMLINK_LOOP = "symlink_loop"
    DICOMDIR = "dicomdir"
    DECODE_ERROR = "decode_error"
    DECODER_CRASHED = "decoder_crashed"
    INVALID_HEADER = "invalid_header"
    BURNED_IN_ANNOTATION = "burned_in_annotation"
    SECONDARY_CAPTURE = "secondary_capture"


class QuarantineRow(StrictModel):
    """One rejected file. Private: the path may contain patient names."""


    relative_path: str
    reason: QuarantineReason
    message: str


class ManifestRow(StrictModel):
    """One image (one CT slice or one frame of a multi-frame CT). Shareable: no identifiers."""


    index: int = Field(ge=0, description="row in images.npy")
    image_key: str = Field(description="HMAC of SOP Instance UID and frame number")
    patient_key: str
    study_key: str
    series_key: str
    frame: int = Field(ge=0)
    label: str = Field(default="", description="class name; empty when unlabelled")
    rows: int
    columns: int
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    manufacturer: str = ""
    model_name: str = ""
    kvp: float | None = None
    transfer_syntax: str = ""
    photometric_interpretation: str = ""
    pad_top: int = 0
    pad_bottom: int = 0
    pad_left: int = 0
    pad_right: int = 0


class PrivateIndexRow(StrictModel):
    """Links a pseudonymous image key back to its source file. Private."""


    image_key: str
    relative_path: str
    content_sha256: str
    frame: int


class WindowSpec(StrictModel):
    """A CT intensity window: HU in [level - width/2, level + width/2] maps linearly to [0, 1]."""


    name: str
    level: float | None = Field(default=None, description="window level (centre) in HU; None for 'none'")
    width: float | None = Field(default=None, gt=0, description="window width in HU; None for 'none'")


class NumericSummary(StrictModel):
    """Distribution summary of one fingerprint quantity."""


    count: int
    min: float | None = None
    p05: float | None = None
    median: float | None = None
    p95: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None


class DatasetFingerprint(StrictModel):
    """The numbers to check before training, as nnU-Net's dataset fingerprint."""


    matrix_sizes: dict[str, int] = Field(description="'ROWSxCOLS' -> image count")
    pixel_spacing_mm: NumericSummary
    slice_thickness_mm: NumericSummary
    hounsfield_units: NumericSummary = Field(description="HU over a pixel sample of every image, before windowing")
    manufacturers: dict[str, int]
    transfer_syntaxes: dict[str, int]
    kvp: NumericSummary


class DatasetCard(StrictModel):
    """dataset.json: how the images were made and what the dataset holds."""


    schema_version: Literal["1.0"] = DATASET_SCHEMA_VERSION
    created_at: str
    ctcompare_version: str
    image_size: int
    channels: Literal[1] = 1
    dtype: Literal["float16"] = "float16"
    value_mapping: str
    window: WindowSpec
    interpolation: str
    padding: str
    n_images: int
    n_patients: int
    n_studies: int
    n_series: int
    n_files_seen: int
    n_files_ingested: int
    n_files_quarantined: int
    quarantine_reasons: dict[str, int]
    labels_source: str | None = Field(default=None, description="key column of the labels file, or None")
    label_distribution: dict[str, int]
    n_unlabeled_images: int
    fingerprint: DatasetFingerprint
    content_hash: str = Field(description="SHA-256 over images.npy bytes and manifest.csv: the dataset's identity")


class DecodedFileRecord(StrictModel):
    """Result of reading one source file (cached per content hash in private/cache). Private: holds raw UIDs."""


    relative_path: str
    content_sha256: str = ""
    accepted: bool
    reason: QuarantineReason | None = None
    message: str = ""
    patient_id: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    instance_number: int | None = None
    n_frames: int = 0
    rows: int = 0
    columns: int = 0
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    manufacturer: str = ""
    model_name: str = ""
    kvp: float | None = None
    transfer_syntax: str = ""
    photometric_interpretation: str = ""
    burned_in_annotation: bool = Field(default=False, description="header says BurnedInAnnotation YES")
    secondary_capture: bool = Field(default=False, description="a Secondary Capture object, not a scanner image")
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
