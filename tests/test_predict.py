"""`ctcompare predict`: hostile files are quarantined and the rest predicted; a request that would not reproduce
the package's recipe is refused with one sentence before any work."""

from __future__ import annotations

import csv
import stat
from pathlib import Path

import pytest
import torch

from data_schemas.dataset import QuarantineRow, WindowSpec
from data_schemas.files import read_model_json, read_models_csv
from data_schemas.package import PACKAGE_FILE, ImagePrediction, PatientPrediction, PredictSummary
from flows.cli import main
from flows.predict import predict_flow
from tasks.packaging.package import load_package
from tasks.packaging.predict import RecipeConflict, check_request, window_argument
from tests.dicom_factory import write_bad_inputs
from tests.ship_fixtures import ShippedRun, copy_test_patient_files, paths_of, run_probabilities, shared_shipped_run


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


def _one_sentence(text: str) -> None:
    line = text.strip().removeprefix("ctcompare predict: ")
    assert "\n" not in line and line.endswith(".") and line.count(". ") == 0, text


def test_hostile_files_are_quarantined_and_the_rest_predicted(shipped: ShippedRun, tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    good = copy_test_patient_files(shipped, src)
    expected = write_bad_inputs(src)
    summary = predict_flow(package=str(shipped.package_dir), dicom_dir=str(src), out_dir=str(tmp_path / "pred"),
                           precision="fp32")
    quarantined = {
        row.relative_path: row.reason.value
        for row in read_models_csv(tmp_path / "pred" / "quarantine.csv", QuarantineRow)
    }
    for relative, reason in expected.items():
        assert quarantined.get(relative) == reason, relative
    predicted = {paths_of(tmp_path / "pred" / "dataset")[row.image_key]
                 for row in read_models_csv(tmp_path / "pred" / "predictions.csv", ImagePrediction)}
    assert set(good) <= predicted and not predicted & set(expected)
    written = read_model_json(tmp_path / "pred" / "predict.json", PredictSummary)
    assert written.n_files_quarantined == len(expected) == summary["summary"]["n_files_quarantined"]
    assert written.n_images == len(predicted) and written.quarantine_reasons["not_ct"] == 1


@pytest.mark.parametrize("extra, words", [
    (["--window", "mediastinal"], "trained on the lung window"),
    (["--window=-600,1500"], None),  # the same window written as numbers is accepted
    (["--size", "64"], "ingested at 48 px"),
])
def test_conflicting_window_or_size_is_refused(shipped: ShippedRun, tmp_path: Path, capsys, extra, words) -> None:
    src = tmp_path / "incoming"
    copy_test_patient_files(shipped, src)
    code = main(["predict", str(shipped.run_dir), str(src), "--out", str(tmp_path / "pred"), *extra])
    if words is None:
        assert code == 0
        return
    assert code == 2
    err = capsys.readouterr().err
    assert words in err
    _one_sentence(err)
    assert not (tmp_path / "pred" / "dataset").exists()  # refused before any work


def test_unknown_labels_and_foreign_recipe_are_refused(shipped: ShippedRun, tmp_path: Path, capsys) -> None:
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows([["patient_id", "label"], ["X1", "cancer"]])
    code = main(
        ["predict", str(shipped.package_dir), str(tmp_path), "--out", str(tmp_path / "pred"), "--labels", str(labels)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cancer" in err and "normal, nodule" in err
    _one_sentence(err)

    # a package written by a converter of another recipe version cannot be reproduced here
    raw = torch.load(shipped.package_dir / PACKAGE_FILE, weights_only=True)
    raw["metadata"]["recipe"]["preprocess_version"] = 99
    foreign = tmp_path / "foreign.pt"
    torch.save(raw, foreign)
    with pytest.raises(RecipeConflict, match="recipe version 99") as refused:
        check_request(load_package(foreign).meta)
    _one_sentence(str(refused.value))


def test_run_folder_without_package_is_refused(shipped: ShippedRun, tmp_path: Path, capsys) -> None:
    run_copy = tmp_path / "run"
    run_copy.mkdir()
    (run_copy / "config.json").write_text((shipped.run_dir / "config.json").read_text())
    assert main(["predict", str(run_copy), str(tmp_path), "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert "holds no model package" in err
    _one_sentence(err)


@pytest.mark.parametrize("window, text", [
    (WindowSpec(name="lung", level=-600, width=1500), "lung"),
    (WindowSpec(name="none"), "none"),
    (WindowSpec(name="custom", level=40.5, width=400), "40.5,400"),
])
def test_window_argument_reproduces_the_recorded_window(window: WindowSpec, text: str) -> None:
    assert window_argument(window) == text


def test_each_prediction_row_points_back_to_its_file(shipped: ShippedRun, tmp_path: Path, capsys) -> None:
    """Every row names its source file and that file's UIDs and PatientID; the probability is the one the run
    gave that file's image, so the row belongs to that file. Identifiers stay owner-only; the summary comes last."""
    import pydicom

    src = tmp_path / "incoming"
    copied = copy_test_patient_files(shipped, src)
    out = tmp_path / "pred"
    capsys.readouterr()
    assert main(["predict", str(shipped.package_dir), str(src), "--out", str(out), "--precision", "fp32"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip().splitlines()[-1].startswith("Predicted ")
    assert "Warning: this model comes from a smoke-profile run" in printed.err

    reference = run_probabilities(shipped.run_dir)
    rows = read_models_csv(out / "predictions.csv", ImagePrediction)
    assert sorted(row.source_path for row in rows) == sorted(copied)
    for row in rows:
        header = pydicom.dcmread(src / row.source_path, stop_before_pixels=True)
        assert (row.patient_id, row.study_instance_uid, row.series_instance_uid, row.sop_instance_uid) == (
            header.PatientID, header.StudyInstanceUID, header.SeriesInstanceUID, header.SOPInstanceUID)
        assert row.prob_positive == pytest.approx(reference[copied[row.source_path]], abs=1e-5)
    patients = read_models_csv(out / "patient_predictions.csv", PatientPrediction)
    ids_by_key = {row.patient_key: row.patient_id for row in rows}
    assert patients and all(patient.patient_id == ids_by_key[patient.patient_key] != "" for patient in patients)

    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("predictions.csv", "patient_predictions.csv", "quarantine.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    summary = read_model_json(out / "predict.json", PredictSummary)
    assert summary.identifier_files == ["predictions.csv", "patient_predictions.csv"]
    assert any("smoke-profile" in warning for warning in summary.warnings)
    written = (out / "predict.json").read_text()
    assert not any(row.patient_id in written or row.sop_instance_uid in written for row in rows)
