"""Ingest: DICOM files to a dataset folder (discovery, decoding, labels, pseudonymization, assembly)."""

from tasks.ingest.assemble import (
    CachedFile,
    IngestError,
    PREPROCESS_VERSION,
    UNWRITABLE_ERRNOS,
    discover_files,
    read_labels,
)
from tasks.ingest.dataset_store import LoadedDataset, load_dataset
from tasks.ingest.decode_pool import ProgressCallback, decode_pool
from tasks.ingest.dicom_io import read_ct_file
from tasks.ingest.label_precheck import KEY_ELEMENTS, check_labels_match_headers, check_labels_task
from tasks.ingest.lesions import attach_lesions, lesion_mask, load_lesions
from tasks.ingest.preprocess import NAMED_WINDOWS, hu_frame_to_image, parse_window, window_level_width

__all__ = ["CachedFile", "IngestError", "KEY_ELEMENTS", "LoadedDataset", "NAMED_WINDOWS", "PREPROCESS_VERSION", "ProgressCallback", "UNWRITABLE_ERRNOS", "attach_lesions", "check_labels_match_headers", "check_labels_task", "decode_pool", "discover_files", "hu_frame_to_image", "lesion_mask", "load_dataset", "load_lesions", "parse_window", "read_ct_file", "read_labels", "window_level_width"]
