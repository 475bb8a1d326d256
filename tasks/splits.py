"""Patient-level, stratified split shared by every arm (splits.csv + splits.json), independent of the pseudonyms.

Ordering. Patients are ordered by a value that does not depend on the pseudonymization key and identifies no one:
the SHA-256 of the sorted SHA-256 hashes of their images' pixel content (images.npy rows). Rows are written in that
order (patients, then images by pixel hash), and every fold assignment below sees groups numbered in that order, so
the same cohort, settings and seed give the same split and the same training batches whatever the HMAC key; the
HMAC pseudonyms are kept only as names. (Two patients with identical pixel content would tie; their order then
falls back to the pseudonym, which cannot change which images are in which part, only their names.)

Folds. Outer folds come from a StratifiedGroupKFold over all labelled patients (groups = patients, stratified by
label, shuffled with the seed). Hold-out mode: round(1 / test_fraction) folds, of which only fold 0 is a test part.
Cross-validated mode: K folds, each the test part of one run, so every labelled patient is tested exactly once.
For outer fold k the validation part is carved from the other patients by a second StratifiedGroupKFold (seed + 1 +
k) into round((1 - test share) / val_fraction) folds, of which the first is validation; the rest train. No patient
is ever in two parts or two outer folds; that is checked and recorded in splits.json. Unlabelled images are left
out. Only hashed keys (the manifest's HMAC pseudonyms) are written.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from data_schemas.dataset import ManifestRow
from data_schemas.files import read_model_json, read_models_csv, sha256_file, write_model_json, write_models_csv
from data_schemas.plan import SplitSettings
from data_schemas.training import SPLITS_INFO_FILE, PartCounts, SplitRow, SplitsInfo

ORDERING = "patients by SHA-256 of their images' sorted pixel-content SHA-256s; images by pixel-content SHA-256"
SPLITTER = "sklearn.model_selection.StratifiedGroupKFold (groups = patients in pixel-content order)"


class SplitsMismatchError(ValueError):
    """An existing split file that belongs to another dataset, seed or split setting."""


def image_content_keys(images: np.ndarray, chunk: int = 256) -> list[str]:
    """SHA-256 of each image's pixel bytes (row i of images.npy): a key-independent, non-identifying name."""
    keys = []
    for start in range(0, images.shape[0], chunk):
        block = np.ascontiguousarray(images[start : start + chunk])
        keys.extend(hashlib.sha256(row.tobytes()).hexdigest() for row in block)
    return keys


def content_order(manifest_rows: Sequence[ManifestRow], content_keys: Sequence[str]) -> list[ManifestRow]:
    """Labelled rows ordered by (patient content key, image content key); see the module doc."""
    labelled = [row for row in manifest_rows if row.label != ""]
    by_patient: dict[str, list[str]] = defaultdict(list)
    for row in labelled:
        by_patient[row.patient_key].append(content_keys[row.index])
    patient_key = {p: hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest() for p, keys in by_patient.items()}
    return sorted(
        labelled, key=lambda r: (patient_key[r.patient_key], content_keys[r.index], r.patient_key, r.image_key)
    )


def patient_ordinals(patient_keys: Sequence[str]) -> np.ndarray:
    """Each row's patient numbered by first appearance: group ids that keep the rows' (content) order."""
    first: dict[str, int] = {}
    return np.asarray([first.setdefault(key, len(first)) for key in patient_keys], dtype=np.int64)


def _group_folds(labels: Sequence[str], groups: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Fold id per row from StratifiedGroupKFold (shuffled with seed)."""
    n_groups = len(set(groups.tolist()))
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} labelled patients, too few for {n_splits} patient-level folds.")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    from sklearn.model_selection import StratifiedGroupKFold  # only when a split is made, not when one is reused

    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members": fine for small cohorts
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), list(labels), groups)):
            fold_of[held_out] = fold
    return fold_of


def _test_share(settings: SplitSettings) -> float:
    if settings.mode == "cross-validated":
        return 1.0 / settings.outer_folds
    return 1.0 / max(2, int(round(1.0 / settings.test_fraction)))


def _outer_folds(rows: Sequence[ManifestRow], settings: SplitSettings) -> list[int | None]:
    """The outer fold in which each (content-ordered) row's patient is tested; None: never tested (hold-out)."""
    groups = patient_ordinals([r.patient_key for r in rows])
    labels = [r.label for r in rows]
    if settings.mode == "cross-validated":
        return [int(f) for f in _group_folds(labels, groups, settings.outer_folds, settings.seed)]
    folds = _group_folds(labels, groups, max(2, int(round(1.0 / settings.test_fraction))), settings.seed)
    return [0 if f == 0 else None for f in folds]


def parts_for_fold(rows: Sequence[SplitRow], outer_fold: int, settings: SplitSettings) -> dict[str, list[SplitRow]]:
    """{"train", "val", "test"} rows of the run on outer_fold, in the split file's (content) order."""
    if not 0 <= outer_fold < settings.outer_folds:
        raise ValueError(f"outer fold {outer_fold} does not exist; the split has {settings.outer_folds} (0 to "
                         f"{settings.outer_folds - 1}).")
    test = [r for r in rows if r.fold == outer_fold]
    rest = [r for r in rows if r.fold != outer_fold]
    n_val = max(2, int(round((1.0 - _test_share(settings)) / settings.val_fraction)))
    groups = patient_ordinals([r.patient_key for r in rest])
    inner = _group_folds([r.label for r in rest], groups, n_val, settings.seed + 1 + outer_fold)
    return {
        "train": [r for r, f in zip(rest, inner) if f != 0],
        "val": [r for r, f in zip(rest, inner) if f == 0],
        "test": test,
    }


def recorded_parts(rows: Sequence[SplitRow], outer_fold: int, settings: SplitSettings) -> dict[str, list[SplitRow]]:
    """parts_for_fold of a split file's rows: outer fold 0's parts as the file records them (its part column, which
    make_splits wrote from parts_for_fold), the other folds' carved by parts_for_fold. Reading them costs no
    StratifiedGroupKFold (nor the sklearn import) on a re-run."""
    if outer_fold != 0:
        return parts_for_fold(rows, outer_fold, settings)
    return {name: [r for r in rows if r.part == name] for name in ("train", "val", "test")}


def make_splits(manifest_rows: Sequence[ManifestRow], images: np.ndarray, settings: SplitSettings) -> list[SplitRow]:
    """Split labelled images by patient, stratified by label; rows in pixel-content order (see the module doc)."""
    if len({row.label for row in manifest_rows if row.label != ""}) < 2:
        raise ValueError("the dataset needs at least two labels to split and train (found fewer among labelled "
                         "images).")
    ordered = content_order(manifest_rows, image_content_keys(images))
    folds = _outer_folds(ordered, settings)
    rows = [
        SplitRow(image_key=r.image_key, patient_key=r.patient_key, label=r.label, part="train", fold=fold)
        for r, fold in zip(ordered, folds)
    ]
    parts = parts_for_fold(rows, 0, settings)
    part_of = {row.image_key: name for name, part_rows in parts.items() for row in part_rows}
    rows = [row.model_copy(update={"part": part_of[row.image_key]}) for row in rows]
    check_no_patient_overlap(rows)
    return rows


def count_patient_overlap(rows: Sequence[SplitRow]) -> int:
    """Patients whose images sit in more than one part or outer fold."""
    where: dict[str, set[tuple[str, int | None]]] = defaultdict(set)
    for row in rows:
        where[row.patient_key].add((row.part, row.fold))
    return sum(1 for places in where.values() if len(places) > 1)


def check_no_patient_overlap(rows: Sequence[SplitRow]) -> None:
    """Raise ValueError when any patient is in two parts or folds."""
    overlap = count_patient_overlap(rows)
    if overlap:
        raise ValueError(f"{overlap} patients appear in more than one split part; the split file is invalid.")


def subsample_patients(rows: Sequence[SplitRow], fraction: float, seed: int) -> list[SplitRow]:
    """Keep a share of the patients (all their images), per label so the class balance stays; deterministic.

    Used for data-efficiency curves: the same seed gives nested subsets (the 25% patients include the 10%).
    Patients are taken in the rows' (pixel-content) order, so the subset does not depend on the pseudonyms.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}.")
    if fraction == 1:
        return list(rows)
    label_of = {row.patient_key: row.label for row in rows}  # dicts keep first-appearance order
    keep: set[str] = set()
    for label in sorted(set(label_of.values())):
        patients = [p for p, lab in label_of.items() if lab == label]
        order = np.random.default_rng([seed, len(patients)]).permutation(len(patients))
        n_keep = max(1, int(round(fraction * len(patients))))
        keep.update(patients[i] for i in order[:n_keep])
    return [row for row in rows if row.patient_key in keep]


def _counts(rows: Sequence[SplitRow]) -> PartCounts:
    return PartCounts(
        images=len(rows),
        patients=len({r.patient_key for r in rows}),
        labels=dict(sorted(Counter(r.label for r in rows).items())),
    )


def info_path(splits_path: Path) -> Path:
    """splits.json beside splits.csv (or <file>.json for another name)."""
    splits_path = Path(splits_path)
    return (
        splits_path.with_name(SPLITS_INFO_FILE)
        if splits_path.name == "splits.csv"
        else Path(str(splits_path) + ".json")
    )


def write_splits(
    *, splits_path: Path, rows: Sequence[SplitRow], dataset_hash: str, settings: SplitSettings, n_unlabeled: int = 0,
) -> SplitsInfo:
    """Write splits.csv, then splits.json (last: its presence marks a complete split)."""
    check_no_patient_overlap(rows)
    splits_path = Path(splits_path)
    write_models_csv(splits_path, rows, SplitRow)
    info = SplitsInfo(
        dataset_hash=dataset_hash,
        seed=settings.seed,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        mode=settings.mode,
        folds=settings.outer_folds,
        folds_requested=settings.outer_folds if settings.mode == "cross-validated" else None,
        ordering=ORDERING,
        splitter=SPLITTER,
        parts={part: _counts([r for r in rows if r.part == part]) for part in ("train", "val", "test")},
        n_unlabeled_excluded=n_unlabeled,
        patient_overlap=count_patient_overlap(rows),
        splits_sha256=sha256_file(splits_path),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_model_json(info_path(splits_path), info)
    return info


def read_splits(splits_path: Path) -> tuple[list[SplitRow], SplitsInfo]:
    """Read and check splits.csv + splits.json (hash of the CSV and patient separation)."""
    splits_path = Path(splits_path)
    meta = info_path(splits_path)
    if not splits_path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"{splits_path} or its {meta.name} is missing; the split was never completed.")
    info = read_model_json(meta, SplitsInfo)
    if sha256_file(splits_path) != info.splits_sha256:
        raise SplitsMismatchError(f"{splits_path} does not match the hash recorded in {meta.name}; it was edited or is "
                                  "partial.")
    rows = read_models_csv(splits_path, SplitRow)
    check_no_patient_overlap(rows)
    return rows, info


def _mismatches(
    info: SplitsInfo,
    rows: Sequence[SplitRow],
    manifest_rows: Sequence[ManifestRow],
    dataset_hash: str,
    settings: SplitSettings,
) -> list[str]:
    """What differs between an existing split and the one asked for (empty: reuse it)."""
    problems = []
    if info.dataset_hash != dataset_hash:
        problems.append("another dataset")
    if info.seed != settings.seed:
        problems.append(f"seed {info.seed}")
    if (info.val_fraction, info.test_fraction) != (settings.val_fraction, settings.test_fraction):
        problems.append(f"val/test fractions {info.val_fraction}/{info.test_fraction}")
    if (info.mode, info.folds) != (settings.mode, settings.outer_folds) or info.ordering != ORDERING:
        problems.append(
            f"{info.mode} mode with {info.folds} outer folds" if info.ordering == ORDERING else "an older split method"
        )
    labelled = {row.image_key for row in manifest_rows if row.label != ""}
    if not problems and labelled != {row.image_key for row in rows}:
        problems.append("other images")
    return problems


def ensure_splits(
    *,
    manifest_rows: Sequence[ManifestRow],
    images: np.ndarray,
    dataset_hash: str,
    splits_path: Path,
    settings: SplitSettings,
) -> tuple[list[SplitRow], SplitsInfo]:
    """Reuse splits_path when it was made for this dataset and these settings; else make and write it.

    An existing file made differently raises SplitsMismatchError (never silently overwritten: other arms use it).
    """
    splits_path = Path(splits_path)
    if splits_path.is_file() and info_path(splits_path).is_file():
        rows, info = read_splits(splits_path)
        problems = _mismatches(info, rows, manifest_rows, dataset_hash, settings)
        if problems:
            raise SplitsMismatchError(
                f"{splits_path} was made for {', '.join(problems)}; pass another split path or delete it to re-split."
            )
        return rows, info
    rows = make_splits(manifest_rows, images, settings)
    n_unlabeled = sum(1 for row in manifest_rows if row.label == "")
    info = write_splits(
        splits_path=splits_path, rows=rows, dataset_hash=dataset_hash, settings=settings, n_unlabeled=n_unlabeled
    )
    return rows, info
