"""Patient-level, stratified train / validation / test split shared by every arm (splits.csv + splits.json).

Test patients are one fold of a StratifiedGroupKFold over all labelled patients (about test_fraction of them). The
other patients get a CV fold id from a second StratifiedGroupKFold: K = --folds, or round((1 - test) / val) so that
one fold is about val_fraction of the data. Fold 0 is the default validation part. Groups are patient keys, so no
patient is ever in two parts or two folds; that is checked and recorded in splits.json. Unlabelled images are left
out. Only hashed keys (the manifest's HMAC pseudonyms) are written.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from data_schemas.dataset import ManifestRow
from data_schemas.training import SPLITS_INFO_FILE, PartCounts, SplitRow, SplitsInfo
from data_schemas.files import read_model_json, read_models_csv, sha256_file, write_model_json, write_models_csv


class SplitsMismatchError(ValueError):
    """An existing split file that belongs to another dataset, seed or fold count."""


def _n_splits(fraction: float) -> int:
    return max(2, int(round(1.0 / fraction)))


def _group_folds(labels: Sequence[str], groups: Sequence[str], n_splits: int, seed: int) -> np.ndarray:
    """Fold id per row from StratifiedGroupKFold (shuffled with seed)."""
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise ValueError(f"only {n_groups} labelled patients, too few for {n_splits} patient-level folds.")
    fold_of = np.full(len(labels), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has only k members": fine for small cohorts
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), list(labels), list(groups))):
            fold_of[held_out] = fold
    return fold_of


def make_splits(
    manifest_rows: Sequence[ManifestRow],
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int | None = None,
) -> list[SplitRow]:
    """Split labelled images by patient, stratified by label; rows in manifest order."""
    labelled = [row for row in manifest_rows if row.label != ""]
    if len({row.label for row in labelled}) < 2:
        raise ValueError("the dataset needs at least two labels to split and train (found fewer among labelled images).")
    labels = [row.label for row in labelled]
    groups = [row.patient_key for row in labelled]
    test_fold = _group_folds(labels, groups, _n_splits(test_fraction), seed)
    is_test = test_fold == 0
    rest = np.flatnonzero(~is_test)
    k = folds if folds is not None else max(2, int(round((1.0 - test_fraction) / val_fraction)))
    if k < 2:
        raise ValueError("--folds must be at least 2.")
    cv_fold = np.full(len(labelled), -1, dtype=np.int64)
    cv_fold[rest] = _group_folds([labels[i] for i in rest], [groups[i] for i in rest], k, seed + 1)
    rows = []
    for i, row in enumerate(labelled):
        if is_test[i]:
            rows.append(SplitRow(image_key=row.image_key, patient_key=row.patient_key, label=row.label, part="test"))
        else:
            fold = int(cv_fold[i])
            part = "val" if fold == 0 else "train"
            rows.append(
                SplitRow(image_key=row.image_key, patient_key=row.patient_key, label=row.label, part=part, fold=fold)
            )
    check_no_patient_overlap(rows)
    return rows


def count_patient_overlap(rows: Sequence[SplitRow]) -> int:
    """Patients whose images sit in more than one part or CV fold."""
    where: dict[str, set[tuple[str, int | None]]] = defaultdict(set)
    for row in rows:
        where[row.patient_key].add(("test", None) if row.part == "test" else ("cv", row.fold))
    return sum(1 for places in where.values() if len(places) > 1)


def check_no_patient_overlap(rows: Sequence[SplitRow]) -> None:
    """Raise ValueError when any patient is in two parts or folds."""
    overlap = count_patient_overlap(rows)
    if overlap:
        raise ValueError(f"{overlap} patients appear in more than one split part; the split file is invalid.")


def n_folds(rows: Sequence[SplitRow]) -> int:
    return 1 + max((row.fold for row in rows if row.fold is not None), default=0)


def parts_for_fold(rows: Sequence[SplitRow], fold: int | None = None) -> dict[str, list[SplitRow]]:
    """{"train", "val", "test"} rows; with a fold, that CV fold is validation and the other folds train."""
    if fold is None or fold == 0:
        parts: dict[str, list[SplitRow]] = {"train": [], "val": [], "test": []}
        for row in rows:
            parts[row.part].append(row)
        return parts
    if fold >= n_folds(rows):
        raise ValueError(f"fold {fold} does not exist; the split file has {n_folds(rows)} folds.")
    parts = {"train": [], "val": [], "test": []}
    for row in rows:
        if row.part == "test":
            parts["test"].append(row)
        else:
            parts["val" if row.fold == fold else "train"].append(row)
    return parts


def subsample_patients(rows: Sequence[SplitRow], fraction: float, seed: int) -> list[SplitRow]:
    """Keep a share of the patients (all their images), per label so the class balance stays; deterministic.

    Used for data-efficiency curves: the same seed gives nested subsets (the 25% patients include the 10%).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}.")
    if fraction == 1:
        return list(rows)
    label_of = {row.patient_key: row.label for row in rows}
    keep: set[str] = set()
    for label in sorted(set(label_of.values())):
        patients = sorted(p for p, lab in label_of.items() if lab == label)
        order = np.random.default_rng([seed, len(patients)]).permutation(len(patients))
        n_keep = max(1, int(round(fraction * len(patients))))
        keep.update(patients[i] for i in order[:n_keep])
    return [row for row in rows if row.patient_key in keep]


def _counts(rows: Sequence[SplitRow]) -> PartCounts:
    return PartCounts(
        images=len(rows), patients=len({r.patient_key for r in rows}), labels=dict(sorted(Counter(r.label for r in rows).items()))
    )


def info_path(splits_path: Path) -> Path:
    return Path(splits_path).with_name(SPLITS_INFO_FILE) if Path(splits_path).name == "splits.csv" else Path(
        str(splits_path) + ".json"
    )


def write_splits(
    splits_path: Path,
    rows: Sequence[SplitRow],
    dataset_hash: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    folds_requested: int | None,
    n_unlabeled: int = 0,
) -> SplitsInfo:
    """Write splits.csv, then splits.json (last: its presence marks a complete split)."""
    check_no_patient_overlap(rows)
    splits_path = Path(splits_path)
    write_models_csv(splits_path, rows, SplitRow)
    info = SplitsInfo(
        dataset_hash=dataset_hash,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        folds=n_folds(rows),
        folds_requested=folds_requested,
        splitter="sklearn.model_selection.StratifiedGroupKFold (groups = patient_key)",
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
        raise SplitsMismatchError(f"{splits_path} does not match the hash recorded in {meta.name}; it was edited or is partial.")
    rows = read_models_csv(splits_path, SplitRow)
    check_no_patient_overlap(rows)
    return rows, info


def ensure_splits(
    manifest_rows: Sequence[ManifestRow],
    dataset_hash: str,
    splits_path: Path,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    folds: int | None = None,
) -> tuple[list[SplitRow], SplitsInfo]:
    """Reuse splits_path when it was made for this dataset, seed, fractions and fold count; else make and write it.

    An existing file made differently raises SplitsMismatchError (never silently overwritten: other arms use it).
    """
    splits_path = Path(splits_path)
    if splits_path.is_file() and info_path(splits_path).is_file():
        rows, info = read_splits(splits_path)
        problems = []
        if info.dataset_hash != dataset_hash:
            problems.append("another dataset")
        if info.seed != seed:
            problems.append(f"seed {info.seed}")
        if (info.val_fraction, info.test_fraction) != (val_fraction, test_fraction):
            problems.append(f"val/test fractions {info.val_fraction}/{info.test_fraction}")
        if folds is not None and folds != info.folds:
            problems.append(f"{info.folds} folds")
        labelled = {row.image_key for row in manifest_rows if row.label != ""}
        if not problems and labelled != {row.image_key for row in rows}:
            problems.append("other images")
        if problems:
            raise SplitsMismatchError(
                f"{splits_path} was made for {', '.join(problems)}; pass another split path or delete it to re-split."
            )
        return rows, info
    rows = make_splits(manifest_rows, seed, val_fraction, test_fraction, folds)
    n_unlabeled = sum(1 for row in manifest_rows if row.label == "")
    info = write_splits(splits_path, rows, dataset_hash, seed, val_fraction, test_fraction, folds, n_unlabeled)
    return rows, info
