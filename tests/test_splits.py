"""Patient-level splits: separation, stratification, determinism, reuse."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_schemas.dataset import ManifestRow
from data_schemas.plan import SplitSettings
from tasks.splits import (
    SplitsMismatchError,
    count_patient_overlap,
    ensure_splits,
    make_splits,
    parts_for_fold,
    read_splits,
    write_splits,
)

HOLDOUT = SplitSettings(seed=0, mode="holdout", outer_folds=1, val_fraction=0.2, test_fraction=0.2)


def _settings(**changes) -> SplitSettings:
    return HOLDOUT.model_copy(update=changes)


def _images(n: int) -> np.ndarray:
    """Distinct pixel content per image (what the split orders by)."""
    return np.random.default_rng(11).random((n, 1, 4, 4)).astype(np.float16)


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


def _split(manifest, **changes):
    return make_splits(manifest, _images(len(manifest)), _settings(**changes))


def test_patients_never_in_two_parts():
    rows = _split(_manifest())
    train, val, test = (_patients(rows, p) for p in ("train", "val", "test"))
    assert train and val and test
    assert not (train & val) and not (train & test) and not (val & test)
    assert count_patient_overlap(rows) == 0
    assert all(r.label != "" for r in rows) and "unlabelled" not in {r.image_key for r in rows}


def test_stratified_and_sized():
    rows = _split(_manifest(60), seed=1)
    for part in ("train", "val", "test"):
        labels = Counter(r.label for r in rows if r.part == part)
        assert labels["abnormal"] > 0 and labels["normal"] > 0, part
    n = len(rows)
    assert 0.1 * n < sum(r.part == "test" for r in rows) < 0.3 * n


def test_same_seed_same_split_other_seed_differs():
    a = _split(_manifest(), seed=3)
    b = _split(_manifest(), seed=3)
    c = _split(_manifest(), seed=4)
    assert a == b
    assert [r.part for r in a] != [r.part for r in c]


def test_cross_validated_outer_folds_test_every_patient_once():
    settings = _settings(mode="cross-validated", outer_folds=4)
    manifest = _manifest()
    rows = make_splits(manifest, _images(len(manifest)), settings)
    labelled = {r.patient_key for r in manifest if r.label}
    tested: list[str] = []
    for fold in range(4):
        parts = parts_for_fold(rows, fold, settings)
        train, val, test = ({r.patient_key for r in parts[p]} for p in ("train", "val", "test"))
        assert train and val and test and not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == labelled
        assert {r.label for r in parts["test"]} == {"abnormal", "normal"}  # stratified
        tested.extend(test)
    assert sorted(tested) == sorted(labelled)  # every labelled patient in exactly one test fold
    for missing in (4, -1):
        with pytest.raises(ValueError) as caught:
            parts_for_fold(rows, missing, settings)
        assert str(caught.value) == f"outer fold {missing} does not exist; the split has 4 (0 to 3)."


def test_split_does_not_depend_on_pseudonyms_or_manifest_order():
    """Other HMAC keys rename every patient and image and reorder the manifest; the split by content is the same."""
    manifest = _manifest(30)
    images = _images(len(manifest))
    renamed = [r.model_copy(update={"patient_key": f"x{hash(r.patient_key) % 10**9:09d}-{r.patient_key[::-1]}",
                                    "image_key": f"y{r.image_key[::-1]}"}) for r in manifest]
    order = np.random.default_rng(5).permutation(len(renamed))
    shuffled = [renamed[i].model_copy(update={"index": k}) for k, i in enumerate(order)]
    for settings in (HOLDOUT, _settings(mode="cross-validated", outer_folds=3)):
        a = make_splits(manifest, images, settings)
        b = make_splits(shuffled, images[order], settings)
        content = {r.image_key: images[r.index].tobytes() for r in manifest}
        content_b = {r.image_key: images[order][r.index].tobytes() for r in shuffled}
        assert [(content[r.image_key], r.part, r.fold) for r in a] == [
            (content_b[r.image_key], r.part, r.fold) for r in b
        ]
        for fold in range(settings.outer_folds):
            pa, pb = parts_for_fold(a, fold, settings), parts_for_fold(b, fold, settings)
            for part in ("train", "val", "test"):  # same images in the same order: same training batches
                assert [content[r.image_key] for r in pa[part]] == [content_b[r.image_key] for r in pb[part]]


def test_write_read_and_reuse(tmp_path):
    manifest = _manifest()
    path = tmp_path / "splits.csv"
    images = _images(len(manifest))

    def ensure(dataset_hash: str, settings: SplitSettings):
        return ensure_splits(
            manifest_rows=manifest, images=images, dataset_hash=dataset_hash, splits_path=path, settings=settings
        )

    rows, info = ensure("hash-a", HOLDOUT)
    assert info.patient_overlap == 0 and info.n_unlabeled_excluded == 1
    assert (tmp_path / "splits.json").is_file()
    again, info2 = ensure("hash-a", HOLDOUT)
    assert again == rows and info2 == info
    with pytest.raises(SplitsMismatchError, match="seed 0"):
        ensure("hash-a", _settings(seed=1))
    with pytest.raises(SplitsMismatchError, match="another dataset"):
        ensure("hash-b", HOLDOUT)
    with pytest.raises(SplitsMismatchError, match="holdout mode"):
        ensure("hash-a", _settings(mode="cross-validated", outer_folds=3))


def test_edited_split_file_is_rejected(tmp_path):
    manifest = _manifest()
    rows = _split(manifest)
    path = tmp_path / "splits.csv"
    write_splits(splits_path=path, rows=rows, dataset_hash="h", settings=HOLDOUT)
    path.write_text(path.read_text().replace(",test,", ",train,", 1))
    with pytest.raises(SplitsMismatchError):
        read_splits(path)


def test_overlap_is_detected():
    rows = _split(_manifest())
    test_row = next(r for r in rows if r.part == "test")
    train_row = next(r for r in rows if r.part == "train")
    bad = rows + [train_row.model_copy(update={"image_key": "extra", "patient_key": test_row.patient_key})]
    assert count_patient_overlap(bad) == 1
    with pytest.raises(ValueError, match="more than one split part"):
        write_splits(splits_path="/nonexistent/splits.csv", rows=bad, dataset_hash="h", settings=HOLDOUT)


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        _split(_manifest(3))


def test_subsample_patients_keeps_whole_patients_per_label_and_nests() -> None:
    from data_schemas.training import SplitRow
    from tasks.splits import subsample_patients

    rows = [
        SplitRow(
            image_key=f"i{p}-{k}", patient_key=f"p{p}", label="nodule" if p % 2 else "normal", part="train", fold=0
        )
        for p in range(20)
        for k in range(3)
    ]
    small = subsample_patients(rows, 0.2, seed=1)
    larger = subsample_patients(rows, 0.5, seed=1)
    patients_small = {r.patient_key for r in small}
    assert len(patients_small) == 4 and len(small) == 12  # 2 per label, every image of each
    assert {r.label for r in small} == {"nodule", "normal"}
    assert patients_small <= {r.patient_key for r in larger}
    assert subsample_patients(rows, 1.0, seed=1) == rows


def test_a_reused_split_names_every_difference_in_one_sentence(tmp_path):
    from data_schemas.files import read_model_json, write_model_json
    from data_schemas.training import SplitsInfo
    from tasks.splits import info_path

    manifest = _manifest()
    path = tmp_path / "splits.csv"
    images = _images(len(manifest))

    def refusal(dataset_hash: str, settings: SplitSettings, rows=manifest) -> str:
        with pytest.raises(SplitsMismatchError) as caught:
            ensure_splits(
                manifest_rows=rows, images=images, dataset_hash=dataset_hash, splits_path=path, settings=settings
            )
        return str(caught.value)

    ensure_splits(manifest_rows=manifest, images=images, dataset_hash="hash-a", splits_path=path, settings=HOLDOUT)
    tail = "; pass another split path or delete it to re-split."
    assert refusal("hash-b", _settings(seed=3)) == f"{path} was made for another dataset, seed 0{tail}"
    assert refusal("hash-a", _settings(val_fraction=0.25)) == f"{path} was made for val/test fractions 0.2/0.2{tail}"
    assert refusal("hash-a", _settings(test_fraction=0.25)) == f"{path} was made for val/test fractions 0.2/0.2{tail}"
    assert refusal("hash-a", _settings(mode="cross-validated", outer_folds=3)) == (f"{path} was made for holdout mode "
                                                                                   f"with 1 outer folds{tail}")
    extra = manifest + [manifest[0].model_copy(update={"index": len(manifest), "image_key": "new-image"})]
    assert refusal("hash-a", HOLDOUT, extra) == f"{path} was made for other images{tail}"
    unlabelled_extra = manifest + [
        manifest[-1].model_copy(update={"index": len(manifest), "image_key": "new-unlabelled"})
    ]
    ensure_splits(manifest_rows=unlabelled_extra, images=_images(len(unlabelled_extra)), dataset_hash="hash-a",
                  splits_path=path, settings=HOLDOUT)  # an unlabelled image is not in the split: reused
    info = read_model_json(info_path(path), SplitsInfo)
    write_model_json(info_path(path), info.model_copy(update={"ordering": "patients by pseudonym"}))
    assert refusal("hash-a", HOLDOUT) == f"{path} was made for an older split method{tail}"
    assert info_path(tmp_path / "splits.csv") == tmp_path / "splits.json"
    assert info_path(tmp_path / "other.csv") == tmp_path / "other.csv.json"


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_training_fraction_outside_0_to_1_is_refused(fraction):
    from tasks.splits import subsample_patients

    with pytest.raises(ValueError) as caught:
        subsample_patients(_split(_manifest()), fraction, seed=1)
    assert str(caught.value) == f"train_fraction must be in (0, 1], got {fraction}."


def test_a_split_without_its_info_file_is_made_again_and_reading_it_says_why(tmp_path):
    from tasks.splits import info_path

    manifest = _manifest()
    path = tmp_path / "splits.csv"
    images = _images(len(manifest))
    rows, _ = ensure_splits(manifest_rows=manifest, images=images, dataset_hash="h", splits_path=path, settings=HOLDOUT)
    info_path(path).unlink()  # interrupted between the two files
    with pytest.raises(FileNotFoundError) as caught:
        read_splits(path)
    assert str(caught.value) == f"{path} or its splits.json is missing; the split was never completed."
    again, info = ensure_splits(
        manifest_rows=manifest, images=images, dataset_hash="h", splits_path=path, settings=HOLDOUT
    )
    assert again == rows and info_path(path).is_file() and read_splits(path)[1] == info
