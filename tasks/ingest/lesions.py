"""Known lesion positions carried from a cohort's sidecar file into a dataset, for the saliency shortcut check.

Sidecar (input, beside labels.csv; format in data_schemas/visual.py LesionSidecarRow and docs/lesions.md):

    path,frame,lesion,center_row,center_col,radius_px
    MRN1234567/ST0042a1b2/SE0003/IM0001.dcm,0,0,201.5,143.25,9.8

    path        file path relative to the DICOM folder given to ingest ('/' separators), as a labels file's
                `path` key; a path relative to a folder above it (e.g. with a leading 'dicom/') also matches
    frame       frame of a multi-frame file, 0 otherwise
    lesion      index of the lesion within the frame
    center_*    lesion centre in the stored pixel grid, pixel (0, 0) = first stored pixel centre; fractions allowed
    radius_px   radius of the circle enclosing the lesion, in stored pixels

`ctcompare synth` writes one for its cohorts; a team with annotations (for example nodule centroids and
diameters converted from mm with PixelSpacing) writes the same columns.

attach_lesions joins the sidecar to the dataset through the dataset's private index (source path -> image_key),
moves every point with the same padding and resize as the pixels (tasks.ingest.preprocess.source_point_to_image, with
the pads the manifest records) and writes <dataset>/lesions.csv keyed by image_key: shareable, no path, no name.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from data_schemas.dataset import (
    DATASET_CARD_FILE,
    MANIFEST_FILE,
    PRIVATE_INDEX_FILE,
    DatasetCard,
    ManifestRow,
    PrivateIndexRow,
)
from data_schemas.files import read_model_json, read_models_csv, write_models_csv
from data_schemas.visual import DATASET_LESIONS_FILE, ImageLesionRow, LesionSidecarRow
from tasks.ingest.preprocess import source_point_to_image


def read_lesion_sidecar(sidecar: Path) -> list[LesionSidecarRow]:
    """Read and validate a lesion sidecar; a bad file is refused in one sentence that names no path inside it."""
    sidecar = Path(sidecar)
    if not sidecar.is_file():
        raise ValueError(f"lesion file {sidecar.name} does not exist.")
    try:
        return read_models_csv(sidecar, LesionSidecarRow)
    except ValueError as error:
        # pydantic's message would quote the row, and the path column may hold names.
        fields = sorted({str(e["loc"][0]) for e in getattr(error, "errors", lambda: [])() if e.get("loc")})
        raise ValueError(f"lesion file {sidecar.name} has invalid rows (columns: {', '.join(fields) or 'header'}); "
                         "see docs/lesions.md for the format.") from None


def _key_of_path(index: list[PrivateIndexRow]) -> dict[tuple[str, int], str]:
    return {(row.relative_path, row.frame): row.image_key for row in index}


def _match(
    path: str, frame: int, keys: dict[tuple[str, int], str], by_suffix: dict[tuple[str, int], str]
) -> str | None:
    """The image key of a sidecar path: exact match first, then a path under a folder above the ingest root."""
    return keys.get((path, frame)) or by_suffix.get((path, frame))


def _suffix_table(keys: dict[tuple[str, int], str], sidecar_paths: set[str]) -> dict[tuple[str, int], str]:
    """Index paths that end with '/' + a sidecar path (the sidecar was written relative to a subfolder)."""
    table: dict[tuple[str, int], str] = {}
    for (relative, frame), key in keys.items():
        parts = relative.split("/")
        for start in range(1, len(parts)):
            tail = "/".join(parts[start:])
            if tail in sidecar_paths:
                table.setdefault((tail, frame), key)
    return table


def map_lesions(sidecar_rows: list[LesionSidecarRow], index: list[PrivateIndexRow],
                manifest: list[ManifestRow], size: int) -> tuple[list[ImageLesionRow], int]:
    """Sidecar lesions moved onto dataset images; returns the rows and how many sidecar rows matched no image."""
    keys = _key_of_path(index)
    by_suffix = _suffix_table(keys, {row.path for row in sidecar_rows if (row.path, row.frame) not in keys})
    manifest_of = {row.image_key: row for row in manifest}
    out: list[ImageLesionRow] = []
    unmatched = 0
    for lesion in sidecar_rows:
        key = _match(lesion.path, lesion.frame, keys, by_suffix)
        image = manifest_of.get(key) if key else None
        if image is None:
            unmatched += 1
            continue
        pads = (image.pad_top, image.pad_bottom, image.pad_left, image.pad_right)
        row, col, scale = source_point_to_image(lesion.center_row, lesion.center_col, rows=image.rows, pads=pads,
                                                size=size)
        out.append(ImageLesionRow(image_key=image.image_key, lesion=lesion.lesion, center_row=round(row, 3),
                                  center_col=round(col, 3), radius_px=round(lesion.radius_px * scale, 3)))
    out.sort(key=lambda r: (r.image_key, r.lesion))
    return out, unmatched


def attach_lesions(*, dataset_dir: Path, sidecar: Path) -> Path:
    """Write <dataset>/lesions.csv (image_key, lesion, centre, radius in the images.npy grid); returns its path."""
    dataset_dir = Path(dataset_dir)
    card = read_model_json(dataset_dir / DATASET_CARD_FILE, DatasetCard)
    rows = read_lesion_sidecar(sidecar)
    index = read_models_csv(dataset_dir / PRIVATE_INDEX_FILE, PrivateIndexRow)
    manifest = read_models_csv(dataset_dir / MANIFEST_FILE, ManifestRow)
    lesions, unmatched = map_lesions(rows, index, manifest, card.image_size)
    if rows and not lesions:
        raise ValueError(f"none of the {len(rows)} rows of lesion file {Path(sidecar).name} matches an ingested file; "
                         "its paths must be relative to the DICOM folder given to ingest.")
    out = dataset_dir / DATASET_LESIONS_FILE
    write_models_csv(out, lesions, ImageLesionRow)
    return out


def load_lesions(dataset_dir: Path) -> dict[str, list[ImageLesionRow]] | None:
    """The dataset's lesions by image_key, or None when the dataset has no lesions.csv (lesions unknown)."""
    path = Path(dataset_dir) / DATASET_LESIONS_FILE
    if not path.is_file():
        return None
    by_key: dict[str, list[ImageLesionRow]] = defaultdict(list)
    for row in read_models_csv(path, ImageLesionRow):
        by_key[row.image_key].append(row)
    return dict(by_key)


def lesion_mask(lesions: list[ImageLesionRow], size: int) -> np.ndarray:
    """A size x size boolean mask: True for pixel centres inside any lesion's disc."""
    rows, cols = np.ogrid[:size, :size]
    mask = np.zeros((size, size), dtype=bool)
    for lesion in lesions:
        mask |= (rows - lesion.center_row) ** 2 + (cols - lesion.center_col) ** 2 <= lesion.radius_px ** 2
    return mask
