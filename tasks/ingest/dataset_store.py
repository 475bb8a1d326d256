"""A dataset folder: reading and writing its shareable part (images.npy, manifest.csv, dataset.json), the lock
that keeps two writers apart, and the permissions of its private part."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from data_schemas.dataset import (
    CACHE_DIR,
    DATASET_CARD_FILE,
    DATASET_LOCK_FILE,
    IMAGES_FILE,
    MANIFEST_FILE,
    PRIVATE_DIR,
    DatasetCard,
    ManifestRow,
)
from data_schemas.files import (
    printable_path,
    read_model_json,
    read_models_csv,
    remove_stale_temp_files,
    temp_path_for,
    write_model_json,
    write_models_csv,
)
from data_schemas.report import outermost_report_folder

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class DatasetBusyError(RuntimeError):
    """Another run holds the dataset folder's write lock for longer than this run will wait."""


@contextlib.contextmanager
def dataset_write_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """Hold the dataset folder's write lock (private/write.lock, via filelock); wait at most timeout_s for it.

    On entry, temp files that an earlier, killed writer left in the folder and its private part are removed:
    under the lock no other writer can be at work there. The decode cache is shared by concurrent decoders, so
    only temp files whose writing process is gone are removed from it.
    """
    root = Path(root)
    ensure_private_dir(root)
    lock = FileLock(root / DATASET_LOCK_FILE, timeout=timeout_s, mode=PRIVATE_FILE_MODE)
    try:
        lock.acquire()
    except Timeout:
        raise DatasetBusyError(
            f"dataset folder {root} is being written by another ctcompare run (waited {timeout_s:g} s); "
            "run again when it has finished."
        ) from None
    try:
        remove_stale_temp_files(root, any_writer=True)
        remove_stale_temp_files(root / PRIVATE_DIR, any_writer=True)
        remove_stale_temp_files(root / CACHE_DIR, recursive=True)
        yield
    finally:
        lock.release()


def ensure_private_dir(root: Path) -> Path:
    """Create the private folder if needed and force it to 0700 and every file in it to 0600, even if it existed."""
    private = Path(root) / PRIVATE_DIR
    private.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    _chmod_if_needed(private, PRIVATE_DIR_MODE)  # first: closed before anything inside is looked at
    for directory, subdirs, files in os.walk(private):
        for name in subdirs:
            _chmod_if_needed(Path(directory) / name, PRIVATE_DIR_MODE)
        for name in files:
            _chmod_if_needed(Path(directory) / name, PRIVATE_FILE_MODE)
    return private


def refuse_private_under_report(dataset_dir: Path, option: str = "--out") -> None:
    """ValueError (one sentence) when a dataset folder, whose private part holds source paths and the
    pseudonymization key, would lie inside a report folder (itself or a parent): sharing that report would ship
    them. Checked before any work; creates nothing."""
    report = outermost_report_folder(Path(dataset_dir).resolve())
    if report is not None:
        raise ValueError(
            f"{option} {printable_path(dataset_dir)} would put a dataset, with its private part (source paths, the "
            f"pseudonymization key), inside the report folder {printable_path(report)}; choose a folder outside it."
        )


def make_private_dirs(folder: Path) -> None:
    """Create folder and its missing parents, each 0700 (mkdir's parents=True would give the parents 0755)."""
    missing = []
    folder = Path(folder)
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for directory in reversed(missing):
        directory.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)


def _chmod_if_needed(path: Path, mode: int) -> None:
    try:
        info = path.lstat()
        if (info.st_mode & 0o777) != mode and not stat.S_ISLNK(info.st_mode):
            os.chmod(path, mode)
    except FileNotFoundError:
        pass  # a concurrent decoder's temp file, renamed meanwhile (its final file is written 0600)


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


@dataclass(frozen=True)
class ImageBlocks:
    """images.npy's content as consecutive blocks of rows, produced one at a time so that they are never all in memory.

    Args:
        shape: the whole array's shape, (N, 1, S, S).
        blocks: called once by the writer; yields arrays of shape (n_i, 1, S, S) whose n_i sum to N, in row order.
    """

    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def of_array(cls, images: np.ndarray) -> ImageBlocks:
        """All images at once, as one block."""
        return cls(shape=tuple(images.shape), blocks=lambda: iter([images]))


def write_images_npy(path: Path, images: np.ndarray | ImageBlocks) -> None:
    """Write images.npy (float16) atomically (temp file + rename), block by block, as a memory-mappable .npy.

    The header is the one np.lib.format.open_memmap writes (so the bytes are those np.save would write); the rows
    then go through ordinary file writes, not a memory map, so that the pages written do not
    count in this process's resident memory: memory stays that of one block, whatever the number of images.
    """
    path = Path(path)
    stream = images if isinstance(images, ImageBlocks) else ImageBlocks.of_array(images)
    tmp = temp_path_for(path)
    try:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=stream.shape)
        offset, expected = header.offset, header.nbytes
        del header  # nothing was written through the map: no page of it was touched
        written = 0
        with open(tmp, "r+b") as handle:
            handle.seek(offset)
            for block in stream.blocks():
                block = np.ascontiguousarray(block, dtype=np.float16)
                if block.shape[1:] != tuple(stream.shape[1:]):
                    raise ValueError(f"an image block has shape {block.shape}; images.npy rows are "
                                     f"{tuple(stream.shape[1:])}")
                handle.write(memoryview(block).cast("B"))
                written += block.nbytes
        if written != expected:
            raise ValueError(f"image blocks held {written} bytes; images.npy of shape {stream.shape} needs {expected}")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_dataset(
    root: Path, images: np.ndarray | ImageBlocks, manifest: list[ManifestRow], card: DatasetCard
) -> DatasetCard:
    """Write images.npy (from an array or streamed ImageBlocks), manifest.csv and dataset.json (card.content_hash is
    filled in here); return the card."""
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
        raise FileNotFoundError(f"{root} is not a ctcompare dataset: {DATASET_CARD_FILE} is missing (run 'ctcompare "
                                "ingest' first).")
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
