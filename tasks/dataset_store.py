"""Reading and writing the shareable part of a dataset folder (images.npy, manifest.csv, dataset.json)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_schemas.dataset import (
    DATASET_CARD_FILE,
    IMAGES_FILE,
    MANIFEST_FILE,
    DatasetCard,
    ManifestRow,
)
from data_schemas.files import read_model_json, read_models_csv, write_model_json, write_models_csv


@dataclass
class LoadedDataset:
    """A dataset folder read back: images row i belongs to manifest row i."""

    images: np.ndarray  # (N, 1, S, S) float16 in [0, 1]
    manifest: list[ManifestRow]
    card: DatasetCard
    root: Path

    @property
    def labels(self) -> list[str]:
        return [row.label for row in self.manifest]

    @property
    def patient_keys(self) -> list[str]:
        return [row.patient_key for row in self.manifest]


def dataset_content_hash(images_path: Path, manifest_path: Path) -> str:
    """SHA-256 over the bytes of images.npy then manifest.csv: equal hashes mean identical datasets."""
    digest = hashlib.sha256()
    for path in (images_path, manifest_path):
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def write_images_npy(path: Path, images: np.ndarray) -> None:
    """Write images.npy atomically (temp file + rename) as a memory-mappable .npy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=images.shape)
    array[...] = images
    array.flush()
    del array
    tmp.replace(path)


def write_dataset(root: Path, images: np.ndarray, manifest: list[ManifestRow], card: DatasetCard) -> DatasetCard:
    """Write images.npy, manifest.csv and dataset.json (card.content_hash is filled in here); return the card."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] != len(manifest):
        raise ValueError(f"images must be (N, 1, S, S) with N == len(manifest); got {images.shape} and {len(manifest)}")
    # No dataset.json while the pair below is being replaced: a crash in between leaves a folder that every
    # reader refuses (and a re-run rebuilds), never a card that describes other images.
    (root / DATASET_CARD_FILE).unlink(missing_ok=True)
    write_images_npy(root / IMAGES_FILE, images)
    write_models_csv(root / MANIFEST_FILE, manifest, ManifestRow)
    card = card.model_copy(update={"content_hash": dataset_content_hash(root / IMAGES_FILE, root / MANIFEST_FILE)})
    # dataset.json goes last: its presence with a matching hash marks a complete dataset.
    write_model_json(root / DATASET_CARD_FILE, card)
    return card


def load_dataset(root: Path, in_memory: bool = True) -> LoadedDataset:
    """Read and validate a dataset folder; in_memory=True reads images.npy once into RAM."""
    root = Path(root)
    card_path = root / DATASET_CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"{root} is not a ctcompare dataset: {DATASET_CARD_FILE} is missing (run 'ctcompare ingest' first).")
    card = read_model_json(card_path, DatasetCard)
    manifest = read_models_csv(root / MANIFEST_FILE, ManifestRow)
    images = np.load(root / IMAGES_FILE, mmap_mode="r")
    if in_memory:
        images = np.ascontiguousarray(images)
    if images.shape[0] != len(manifest) or images.shape[1:] != (1, card.image_size, card.image_size):
        raise ValueError(
            f"{root}: images.npy has shape {images.shape} but manifest.csv has {len(manifest)} rows "
            f"at size {card.image_size}; the dataset is inconsistent, re-run 'ctcompare ingest'."
        )
    return LoadedDataset(images=images, manifest=manifest, card=card, root=root)
