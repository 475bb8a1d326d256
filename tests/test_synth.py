"""`ctcompare synth`: real DICOM files read back with pydicom, labels, identifiers, determinism, skip, CLI."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import CTImageStorage, RLELossless

from data_schemas.files import read_model_json, read_models_csv
from data_schemas.synth import COHORT_CARD_FILE, CohortCard, IdentifiersFile, LabelRow
from data_schemas.visual import LESIONS_SIDECAR_FILE, LesionSidecarRow
from flows.cli import main
from tasks.demo.planning import plan_cohort
from tasks.demo.render import render_patient_hu
from tasks.demo.synth import (
    CohortMismatchError,
    start_cohort,
    synth_parameters,
    synthesize_cohort,
)

PATIENTS, SLICES, SEED = 6, 2, 11


def _dicom_files(dicom_dir: Path) -> list[Path]:
    return sorted(p for p in dicom_dir.rglob("*") if p.is_file())


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory):
    return synthesize_cohort(tmp_path_factory.mktemp("synth") / "cohort", PATIENTS, SLICES, SEED)


@pytest.fixture(scope="module")
def datasets(cohort) -> list[tuple[Path, pydicom.Dataset]]:
    return [(path, pydicom.dcmread(path)) for path in _dicom_files(cohort.dicom_dir)]


def test_files_are_ct_image_storage_with_study_series_structure(cohort, datasets):
    assert cohort.n_slices == len(datasets) == PATIENTS * SLICES
    series_per_patient: dict[str, set[str]] = {}
    for path, ds in datasets:
        assert ds.SOPClassUID == CTImageStorage and ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
        assert ds.Modality == "CT" and ds.RescaleType == "HU" and float(ds.RescaleSlope) == 1.0
        assert path.parent.parent.parent.name == ds.PatientID
        series_per_patient.setdefault(ds.PatientID, set()).add((ds.StudyInstanceUID, ds.SeriesInstanceUID))
        assert 1 <= ds.InstanceNumber <= SLICES
        assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))
        assert float(ds.SliceThickness) in (1.0, 1.25, 2.5, 5.0)
        assert ds.Manufacturer and ds.ManufacturerModelName and ds.ConvolutionKernel and float(ds.KVP) > 0
    assert len(series_per_patient) == PATIENTS
    assert all(len(series) == 1 for series in series_per_patient.values())
    sops = [ds.SOPInstanceUID for _, ds in datasets]
    assert len(set(sops)) == len(sops)


def test_hounsfield_units_are_plausible(datasets):
    for _, ds in datasets:
        hu = apply_rescale(ds.pixel_array, ds)
        n = ds.Rows
        air = np.median(hu[4:12, n // 2 - 4:n // 2 + 4])  # above the patient, inside the reconstruction circle
        assert -1010 <= air <= -985
        lung_share = np.mean((hu > -950) & (hu < -700))
        assert lung_share > 0.05
        histogram, edges = np.histogram(hu, bins=np.arange(-960, -600, 20))
        assert -900 <= edges[np.argmax(histogram)] <= -780  # the lung peak
        assert hu.max() > 600  # ribs and spine
        assert np.mean((hu > -150) & (hu < 80)) > 0.1  # fat and soft tissue


def test_formats_matrix_sizes_and_file_names_are_mixed(cohort, datasets):
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for _, ds in datasets)
    assert syntaxes[RLELossless] >= SLICES
    for _, ds in datasets:
        if ds.file_meta.TransferSyntaxUID == RLELossless:
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)  # RLE decodes
    assert {ds.Rows for _, ds in datasets} == {512, 256}
    assert any(path.suffix == "" for path, _ in datasets)
    assert any(path.suffix == ".dcm" for path, _ in datasets)
    spacing_512 = [float(ds.PixelSpacing[0]) for _, ds in datasets if ds.Rows == 512]
    assert all(0.6 <= s <= 0.9 for s in spacing_512)


def test_labels_are_balanced_and_keyed_by_patient_id(cohort, datasets):
    rows = read_models_csv(cohort.labels_path, LabelRow)
    assert cohort.labels_path.read_text().splitlines()[0] == "patient_id,label"
    assert {row.patient_id for row in rows} == {ds.PatientID for _, ds in datasets}
    assert Counter(row.label for row in rows) == {"nodule": 3, "normal": 3}
    assert cohort.label_counts == {"nodule": 3, "normal": 3}
    big = Counter(p.label for p in plan_cohort(150, 1, SEED))
    assert 0.45 <= big["nodule"] / 150 <= 0.5


def test_every_slice_of_a_nodule_patient_shows_a_nodule_inside_the_lung():
    plans = plan_cohort(PATIENTS, 3, SEED)
    for plan in plans:
        assert bool(plan.nodules) == (plan.label == "nodule")
        if not plan.nodules:
            continue
        for with_nodule, without in zip(render_patient_hu(plan), render_patient_hu(plan, include_nodules=False)):
            changed = np.abs(with_nodule - without) > 100
            assert changed.sum() >= 3  # visible in this slice
            assert np.median(without[changed]) < -500  # and drawn on lung, not on the mediastinum
        assert all(8.0 <= n.diameter_mm <= 26.0 and -300 <= n.core_hu <= 100 for n in plan.nodules)


def test_lesion_sidecar_gives_every_nodule_slice_its_discs_in_the_stored_pixel_grid(cohort, datasets):
    rows = read_models_csv(cohort.out_dir / LESIONS_SIDECAR_FILE, LesionSidecarRow)
    plans = {p.patient_id: p for p in plan_cohort(PATIENTS, SLICES, SEED)}
    by_path = {path.relative_to(cohort.dicom_dir).as_posix(): ds for path, ds in datasets}
    nodule_files = {path for path, ds in by_path.items() if plans[ds.PatientID].label == "nodule"}
    assert {row.path for row in rows} == nodule_files  # every nodule slice, no normal slice
    for row in rows:
        ds = by_path[row.path]
        plan = plans[ds.PatientID]
        # Rendered HU before storage: the stored pixel grid, without the clipping that differs with the scanner.
        hu = list(render_patient_hu(plan))[ds.InstanceNumber - 1]
        without = list(render_patient_hu(plan, include_nodules=False))[ds.InstanceNumber - 1]
        assert hu.shape == (ds.Rows, ds.Columns)
        r, c = round(row.center_row), round(row.center_col)
        assert hu[r, c] - without[r, c] > 100  # the centre pixel is on the drawn nodule
        assert 4.0 / 2 / 0.9 <= row.radius_px <= 26.0 * 1.12 * 1.6 / 2 / (0.6 * 512 / ds.Rows) + 1
        yy, xx = np.ogrid[:ds.Rows, :ds.Columns]
        changed = np.abs(hu - without) > 100
        outside = changed & ((yy - row.center_row) ** 2 + (xx - row.center_col) ** 2 > (row.radius_px + 1.5) ** 2)
        others = [o for o in rows if o.path == row.path and o is not row]
        if not others:
            assert not outside.any()  # the disc encloses the whole visible nodule


def test_identifiers_are_in_headers_and_in_the_private_file(cohort, datasets):
    private = read_model_json(cohort.identifiers_path, IdentifiersFile)
    assert private.identifiers == cohort.identifiers
    by_id = {p.patient_id: p for p in private.patients}
    for path, ds in datasets:
        ids = by_id[ds.PatientID]
        assert str(ds.PatientName) == ids.patient_name and "^" in ids.patient_name
        assert ds.PatientBirthDate == ids.patient_birth_date
        assert ds.AccessionNumber == ids.accession_number and ds.StudyID == ids.study_id
        assert ds.InstitutionName == ids.institution_name
        assert str(ds.ReferringPhysicianName) == ids.referring_physician_name
    header_bytes = b"".join(path.read_bytes()[:4096] for path, _ in datasets)
    for identifier in private.identifiers:
        assert identifier.encode() in header_bytes
    card_text = cohort.cohort_card_path.read_text()
    assert not any(identifier in card_text for identifier in private.identifiers)  # cohort.json is shareable


def test_same_seed_gives_identical_files_and_another_seed_does_not(cohort, tmp_path):
    again = synthesize_cohort(tmp_path / "again", PATIENTS, SLICES, SEED)
    assert _tree_digest(again.out_dir) == _tree_digest(cohort.out_dir)
    other = synthesize_cohort(tmp_path / "other", PATIENTS, SLICES, SEED + 1)
    assert set(other.identifiers).isdisjoint({i for i in cohort.identifiers if i.startswith("MRN")})


def test_complete_cohort_is_kept_and_other_parameters_are_refused(cohort):
    before = {p: p.stat().st_mtime_ns for p in _dicom_files(cohort.dicom_dir)}
    again = synthesize_cohort(cohort.out_dir, PATIENTS, SLICES, SEED)
    assert again.skipped and again.n_slices == cohort.n_slices
    assert {p: p.stat().st_mtime_ns for p in _dicom_files(cohort.dicom_dir)} == before
    with pytest.raises(CohortMismatchError):
        synthesize_cohort(cohort.out_dir, PATIENTS, SLICES, SEED + 1)


def test_interrupted_run_is_redone_cleanly(tmp_path):
    out = tmp_path / "cohort"
    dicom_dir = start_cohort(out, synth_parameters(3, 1, 5))
    (dicom_dir / "half-written").write_bytes(b"partial")
    summary = synthesize_cohort(out, 3, 1, 5)
    assert not summary.skipped
    assert read_model_json(out / COHORT_CARD_FILE, CohortCard).complete
    assert not (dicom_dir / "half-written").exists()
    assert len(_dicom_files(dicom_dir)) == 3


def test_cli_writes_a_cohort_and_logs_no_identifiers(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--patients", "3", "--slices-per-patient", "1", "--seed", "5"]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 1 and "3 CT slices of 3 patients" in printed.out
    identifiers = json.loads((out / "identifiers.json").read_text())["identifiers"]
    assert not any(identifier in printed.out + printed.err for identifier in identifiers)
    assert read_model_json(out / COHORT_CARD_FILE, CohortCard).complete
    assert len(_dicom_files(out / "dicom")) == 3
    assert (out / LESIONS_SIDECAR_FILE).read_text().startswith("path,frame,lesion,center_row,center_col,radius_px\n")
    assert main(["synth", str(out), "--patients", "3", "--slices-per-patient", "1", "--seed", "5"]) == 0
    assert "kept existing" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--patients", "1"], ["--slices-per-patient", "0"]])
def test_cli_bad_argument_is_one_sentence_and_no_work(tmp_path, capsys, argv):
    out = tmp_path / "bad"
    assert main(["synth", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctcompare synth: ") and err.endswith(".") and "\n" not in err
    assert not out.exists()


def test_cli_refuses_a_folder_holding_another_cohort(cohort, capsys):
    assert main(["synth", str(cohort.out_dir), "--patients", "4", "--slices-per-patient", "1"]) == 2
    assert "other parameters" in capsys.readouterr().err
    assert os.path.isfile(cohort.cohort_card_path)
