"""Ingest: DICOM files to a dataset folder (discovery, decoding, labels, pseudonymization, assembly)."""

from tasks.ingest.assemble import IngestResult, assemble_dataset
from tasks.ingest.dataset_store import LoadedDataset, load_dataset
from tasks.ingest.decode import PREPROCESS_VERSION, CachedFile, decode_chunk, decode_files, load_cached_files
from tasks.ingest.decode_pool import DecodePool, ProgressCallback, decode_pool
from tasks.ingest.dicom_io import read_ct_file
from tasks.ingest.discover import SourceFile, discover_files
from tasks.ingest.errors import IngestError, OutputWriteError
from tasks.ingest.labels import (
    KEY_ELEMENTS,
    LabelTable,
    check_labels_match_headers,
    check_labels_task,
    read_labels,
)
from tasks.ingest.lesions import attach_lesions, lesion_mask, load_lesions
from tasks.ingest.preprocess import NAMED_WINDOWS, hu_frame_to_image, parse_window, window_level_width

__all__ = [
    "CachedFile", "DecodePool", "IngestError", "IngestResult", "KEY_ELEMENTS", "LabelTable", "LoadedDataset",
    "NAMED_WINDOWS", "OutputWriteError", "PREPROCESS_VERSION", "ProgressCallback", "SourceFile", "assemble_dataset",
    "attach_lesions", "check_labels_match_headers", "check_labels_task", "decode_chunk", "decode_files",
    "decode_pool", "discover_files", "hu_frame_to_image", "lesion_mask", "load_cached_files", "load_dataset",
    "load_lesions", "parse_window", "read_ct_file", "read_labels", "window_level_width",
]
