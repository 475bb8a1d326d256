"""Patient-level splits: separation, stratification, determinism, reuse."""

from __future__ import annotations

from collections import Counter

import pytest

from data_schemas.dataset import ManifestRow
from tasks.splits import (
    SplitsMismatchError,
    count_patient_overlap,
    ensure_splits,
    make_splits,
    n_folds,
    parts_for_fold,
    read_splits,
    write_splits,
)


def _manifest(n_patients: int = 40, seed: int = 0) -> list[ManifestRow]:
    rows = []
    for p in range(n_patients):
        label = "abnormal" if p % 3 == 0 else "normal"  # imbalanced 1:2
        for k in range(1 + (p * 7 + seed) % 4):  # 1 to 4 images per patient
            i = len(rows)
            rows.append(ManifestRow(index=i, image_key=f"i{i:04d}", patient_key=f"p{p:03d}", study_key="s",
                                    series_key="r", frame=0, label=label, rows=8, columns=8))
    rows.append(ManifestRow(index=len(rows), image_key="unlabelled", patient_key="p999", study_key="s",
                            series_key="r", frame=0, label="", rows=8, columns=8))
    return rows


def _patients(rows, part):
    return {r.patient_key for r in rows if r.part == part}


def test_patients_never_in_two_parts():
    rows = make_splits(_manifest(), seed=0, val_fraction=0.2, test_fraction=0.2)
    train, val, test = (_patients(rows, p) for p in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert count_patient_overlap(rows) == 0
    assert all(r.label != "" for r in rows) and "unlabelled" not in {r.image_key for r in rows}


def test_stratified_and_sized():
    rows = make_splits(_manifest(60), seed=1, val_fraction=0.2, test_fraction=0.2)
    for part in ("train", "val", "test"):
        labels = Counter(r.label for r in rows if r.part == part)
        assert labels["abnormal"] > 0 and labels["normal"] > 0, part
    n = len(rows)
    assert 0.1 * n < sum(r.part == "test" for r in rows) < 0.3 * n


def test_same_seed_same_split_other_seed_differs():
    a = make_splits(_manifest(), seed=3, val_fraction=0.2, test_fraction=0.2)
    b = make_splits(_manifest(), seed=3, val_fraction=0.2, test_fraction=0.2)
    c = make_splits(_manifest(), seed=4, val_fraction=0.2, test_fraction=0.2)
    assert a == b
    assert [r.part for r in a] != [r.part for r in c]


def test_k_folds_cover_non_test_patients_once():
    rows = make_splits(_manifest(), seed=0, val_fraction=0.2, test_fraction=0.2, folds=4)
    assert n_folds(rows) == 4
    test = _patients(rows, "test")
    seen = set()
    for fold in range(4):
        parts = parts_for_fold(rows, fold)
        val = {r.patient_key for r in parts["val"]}
        train = {r.patient_key for r in parts["train"]}
        assert val and not (val & train) and not (val & test) and not (train & test)
        assert {r.patient_key for r in parts["test"]} == test
        assert not (val & seen)
        seen |= val
    assert seen | test == {r.patient_key for r in rows}


def test_write_read_and_reuse(tmp_path):
    manifest = _manifest()
    path = tmp_path / "splits.csv"
    rows, info = ensure_splits(manifest, "hash-a", path, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert info.patient_overlap == 0 and info.n_unlabeled_excluded == 1
    assert (tmp_path / "splits.json").is_file()
    again, info2 = ensure_splits(manifest, "hash-a", path, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert again == rows and info2 == info
    with pytest.raises(SplitsMismatchError, match="seed 0"):
        ensure_splits(manifest, "hash-a", path, seed=1, val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(SplitsMismatchError, match="another dataset"):
        ensure_splits(manifest, "hash-b", path, seed=0, val_fraction=0.2, test_fraction=0.2)


def test_edited_split_file_is_rejected(tmp_path):
    manifest = _manifest()
    rows = make_splits(manifest, seed=0, val_fraction=0.2, test_fraction=0.2)
    path = tmp_path / "splits.csv"
    write_splits(path, rows, "h", 0, 0.2, 0.2, None)
    path.write_text(path.read_text().replace(",test,", ",train,", 1))
    with pytest.raises(SplitsMismatchError):
        read_splits(path)


def test_overlap_is_detected():
    rows = make_splits(_manifest(), seed=0, val_fraction=0.2, test_fraction=0.2)
    test_row = next(r for r in rows if r.part == "test")
    train_row = next(r for r in rows if r.part == "train")
    bad = rows + [train_row.model_copy(update={"image_key": "extra", "patient_key": test_row.patient_key})]
    assert count_patient_overlap(bad) == 1
    with pytest.raises(ValueError, match="more than one split part"):
        write_splits("/nonexistent/splits.csv", bad, "h", 0, 0.2, 0.2, None)


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        make_splits(_manifest(3), seed=0, val_fraction=0.2, test_fraction=0.2)


def test_subsample_patients_keeps_whole_patients_per_label_and_nests() -> None:
    from data_schemas.training import SplitRow
    from tasks.splits import subsample_patients

    rows = [
        SplitRow(image_key=f"i{p}-{k}", patient_key=f"p{p}", label="nodule" if p % 2 else "normal", part="train", fold=0)
        for p in range(20) for k in range(3)
    ]
    small = subsample_patients(rows, 0.2, seed=1)
    larger = subsample_patients(rows, 0.5, seed=1)
    patients_small = {r.patient_key for r in small}
    assert len(patients_small) == 4 and len(small) == 12  # 2 per label, every image of each
    assert {r.label for r in small} == {"nodule", "normal"}
    assert patients_small <= {r.patient_key for r in larger}
    assert subsample_patients(rows, 1.0, seed=1) == rows
