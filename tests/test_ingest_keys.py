"""Ingest end to end (real Prefect flow, real pydicom files): every label key kind, MONOCHROME1, and a new window.

Each test checks an outcome per source file, so a pipeline bug (keys swapped, a flag dropped, a stale cache)
fails at an assertion that names it rather than at a schema check.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from data_schemas.dataset import PRIVATE_INDEX_FILE, DatasetCard, DecodedFileRecord, ManifestRow, PrivateIndexRow
from data_schemas.files import read_models_csv
from flows.ingest import ingest_flow
from tasks.ingest.dataset_store import load_dataset
from tests.dicom_factory import ct_variant

STUDY_1, STUDY_2, STUDY_3 = generate_uid(), generate_uid(), generate_uid()
SERIES_1, SERIES_2, SERIES_3, SERIES_4 = generate_uid(), generate_uid(), generate_uid(), generate_uid()
SOP_A, SOP_C = generate_uid(), generate_uid()
# One patient with two studies (the first with two series), and a second patient: every key kind groups differently.
COHORT = {
    "a.dcm": {"patient_id": "P1", "StudyInstanceUID": STUDY_1, "SeriesInstanceUID": SERIES_1, "sop_uid": SOP_A},
    "b.dcm": {"patient_id": "P1", "StudyInstanceUID": STUDY_1, "SeriesInstanceUID": SERIES_2},
    "sub/c.dcm": {"patient_id": "P1", "StudyInstanceUID": STUDY_2, "SeriesInstanceUID": SERIES_3, "sop_uid": SOP_C},
    "sub/d.dcm": {"patient_id": "P2", "StudyInstanceUID": STUDY_3, "SeriesInstanceUID": SERIES_4},
}
# key column -> (labels file rows, expected label per file; "" = unlabelled). The study and series files each carry a
# row keyed by a UID of the other kind ("wrong-kind"), which must match nothing: read as the other kind, it would.
KEY_CASES: dict[str, tuple[list[tuple[str, str]], dict[str, str]]] = {
    "patient_id": (
        [("P1", "nodule"), ("P2", "normal")],
        {"a.dcm": "nodule", "b.dcm": "nodule", "sub/c.dcm": "nodule", "sub/d.dcm": "normal"},
    ),
    "study_instance_uid": (
        [(STUDY_1, "nodule"), (STUDY_3, "normal"), (SERIES_3, "wrong-kind")],
        {"a.dcm": "nodule", "b.dcm": "nodule", "sub/c.dcm": "", "sub/d.dcm": "normal"},
    ),
    "series_instance_uid": (
        [(SERIES_2, "nodule"), (SERIES_3, "normal"), (STUDY_3, "wrong-kind")],
        {"a.dcm": "", "b.dcm": "nodule", "sub/c.dcm": "normal", "sub/d.dcm": ""},
    ),
    "sop_instance_uid": (
        [(SOP_C, "nodule"), (SOP_A, "normal")],
        {"a.dcm": "normal", "b.dcm": "", "sub/c.dcm": "nodule", "sub/d.dcm": ""},
    ),
    "path": (
        [("sub/d.dcm", "nodule"), ("a.dcm", "normal")],
        {"a.dcm": "normal", "b.dcm": "", "sub/c.dcm": "", "sub/d.dcm": "nodule"},
    ),
}


def write_labels(path: Path, key: str, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([key, "label"])
        writer.writerows(rows)
    return path


def labels_by_file(dataset: Path) -> dict[str, str]:
    """Source file -> label written in the manifest, joined through the private index."""
    paths = {row.image_key: row.relative_path for row in read_models_csv(dataset / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    return {paths[row.image_key]: row.label for row in read_models_csv(dataset / "manifest.csv", ManifestRow)}


def images_by_file(dataset: Path) -> dict[str, np.ndarray]:
    """Source file -> its stored (single-frame) image as float32."""
    loaded = load_dataset(dataset)
    index = read_models_csv(dataset / PRIVATE_INDEX_FILE, PrivateIndexRow)
    positions = {row.image_key: position for position, row in enumerate(loaded.manifest)}
    return {
        row.relative_path: np.asarray(loaded.images[positions[row.image_key], 0], dtype=np.float32) for row in index
    }


def test_every_label_key_kind_labels_exactly_its_files(tmp_path: Path) -> None:
    """Patient, study, series, SOP instance and path keys each pick out their own files through the full ingest."""
    src = tmp_path / "src"
    for relative, fields in COHORT.items():
        changes = {k: v for k, v in fields.items() if k not in {"patient_id", "sop_uid"}}
        ct_variant(src / relative, patient_id=fields["patient_id"], sop_uid=fields.get("sop_uid"), **changes)
    out = tmp_path / "dataset"
    for key, (rows, expected) in KEY_CASES.items():
        labels = write_labels(tmp_path / f"labels_{key}.csv", key, rows)
        summary = ingest_flow(src_dir=str(src), out_dir=str(out), labels=str(labels), size=32, workers=1)
        assert labels_by_file(out) == expected, f"labels keyed on {key} went to the wrong files"
        card = DatasetCard.model_validate(summary["card"])
        assert card.labels_source == key
        assert card.n_unlabeled_images == sum(1 for label in expected.values() if not label)
        unlabeled = (out / "private/unlabeled.csv").read_text().splitlines()[1:]
        assert unlabeled == sorted(path for path, label in expected.items() if not label)


def test_monochrome1_file_is_stored_inverted_and_flagged(tmp_path: Path) -> None:
    """The same pixels as MONOCHROME1 and MONOCHROME2: the stored images are v and 1 - v, and the flag is kept."""
    src = tmp_path / "src"
    ct_variant(src / "mono2.dcm", patient_id="P1")
    ct_variant(src / "mono1.dcm", patient_id="P2", PhotometricInterpretation="MONOCHROME1")
    out = tmp_path / "dataset"
    ingest_flow(src_dir=str(src), out_dir=str(out), size=32, window="lung", workers=1)
    images = images_by_file(out)
    mono2, mono1 = images["mono2.dcm"], images["mono1.dcm"]
    assert float(mono2.std()) > 0.05  # a real image, not a flat one whose inverse could look alike
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=2e-3, err_msg="MONOCHROME1 was not inverted by ingest")
    paths = {row.image_key: row.relative_path for row in read_models_csv(out / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    photometric = {
        paths[row.image_key]: row.photometric_interpretation
        for row in read_models_csv(out / "manifest.csv", ManifestRow)
    }
    assert photometric == {"mono1.dcm": "MONOCHROME1", "mono2.dcm": "MONOCHROME2"}
    records = {}
    for cached in (out / "private/cache").rglob("*.npz"):
        with np.load(cached) as entry:
            record = DecodedFileRecord.model_validate_json(str(entry["record"]))
        records[record.relative_path] = record.photometric_interpretation
    assert records == {"mono1.dcm": "MONOCHROME1", "mono2.dcm": "MONOCHROME2"}


def test_reingest_with_another_window_rebuilds_the_images(tmp_path: Path) -> None:
    """A second ingest into the same folder with another window is not 'skipped': it equals a clean run."""
    src = tmp_path / "src"
    ct_variant(src / "a.dcm", patient_id="P1")
    ct_variant(src / "b.dcm", patient_id="P2", InstanceNumber=2)
    out = tmp_path / "dataset"
    first = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, window="lung", workers=1)
    lung = images_by_file(out)
    second = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, window="mediastinal", workers=1)
    assert second["skipped"] is False, "a new window was taken for the same inputs"
    assert second["card"]["window"]["name"] == "mediastinal"
    assert second["card"]["content_hash"] != first["card"]["content_hash"]
    mediastinal = images_by_file(out)
    for path in lung:
        assert not np.allclose(lung[path], mediastinal[path], atol=1e-2), f"{path}: images kept from the old window"
    clean = tmp_path / "clean"
    ingest_flow(src_dir=str(src), out_dir=str(clean), size=32, window="mediastinal", workers=1)
    for path, image in images_by_file(clean).items():
        np.testing.assert_array_equal(mediastinal[path], image)
    back = ingest_flow(src_dir=str(src), out_dir=str(out), size=32, window="lung", workers=1)
    assert back["card"]["content_hash"] == first["card"]["content_hash"]


@pytest.mark.parametrize("key", ["study_instance_uid", "series_instance_uid"])
def test_a_uid_of_the_other_kind_matches_nothing(tmp_path: Path, key: str) -> None:
    """A series UID in a study-keyed file (and the reverse) labels nothing: the keys are not interchangeable."""
    from tasks.ingest.errors import IngestError

    src = tmp_path / "src"
    fields = COHORT["a.dcm"]
    ct_variant(
        src / "a.dcm",
        patient_id="P1",
        StudyInstanceUID=fields["StudyInstanceUID"],
        SeriesInstanceUID=fields["SeriesInstanceUID"],
    )
    other = fields["SeriesInstanceUID"] if key == "study_instance_uid" else fields["StudyInstanceUID"]
    labels = write_labels(tmp_path / "labels.csv", key, [(other, "nodule")])
    with pytest.raises(IngestError, match=f"no {key} in labels file labels.csv matches"):
        ingest_flow(src_dir=str(src), out_dir=str(tmp_path / "out"), labels=str(labels), size=32, workers=1)
