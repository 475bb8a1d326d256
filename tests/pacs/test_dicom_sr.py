"""Predict from a real Orthanc and send one DICOM SR per study back: found by QIDO, read back with highdicom, with
the decision of predictions.csv and references to the study's instances."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from data_schemas.dataset import PRIVATE_INDEX_FILE, PrivateIndexRow
from data_schemas.files import read_models_csv
from data_schemas.package import (
    PATIENT_PREDICTIONS_FILE,
    PREDICT_DATASET_DIR,
    PREDICTIONS_FILE,
    ImagePrediction,
    PatientPrediction,
)
from flows.predict import predict_flow
from tasks.packaging.dicom_overlay import OVERLAY_DIR
from tasks.packaging.dicom_sr import (
    SR_DIR,
    SR_SERIES_DESCRIPTION,
    finding_concept,
    read_study_report,
)
from tests.orthanc_server import OrthancServer
from tests.pacs.pacs_helpers import upload
from tests.ship_fixtures import SHIPPED_ARM, ShippedRun, copy_test_patient_files, shared_shipped_run


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> ShippedRun:
    return shared_shipped_run(tmp_path_factory)


def test_reports_sent_back_are_found_and_match_predictions(shipped: ShippedRun, fresh_orthanc: OrthancServer,
                                                           tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    incoming = tmp_path / "incoming"
    copy_test_patient_files(shipped, incoming)
    sources = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in incoming.rglob("*") if path.is_file()}
    upload(fresh_orthanc.dicomweb_url, sorted(sources))
    out = tmp_path / "pred"
    result = predict_flow(package=str(shipped.package_dir), dicom_dir=fresh_orthanc.dicomweb_url, out_dir=str(out),
                          precision="fp32", study_date="any", send_url=fresh_orthanc.dicomweb_url,
                          overlay=True)

    studies = {str(ds.StudyInstanceUID) for ds in sources.values()}
    assert result["sent"] == len(result["reports"]) == 2 * len(studies)  # an SR and an overlay per study
    for path in map(Path, result["reports"]):
        assert path.parent in (out / SR_DIR, out / OVERLAY_DIR) and path.stat().st_mode & 0o077 == 0
    assert (out / "private").stat().st_mode & 0o077 == 0

    # The expected decision of each study: its patient's row of patient_predictions.csv (one study per patient).
    index = {row.image_key: row.relative_path for row in
             read_models_csv(out / PREDICT_DATASET_DIR / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    patient_of_study = {index[row.image_key].split("/")[0]: row.patient_key
                        for row in read_models_csv(out / PREDICTIONS_FILE, ImagePrediction)}
    decisions = {row.patient_key: row for row in read_models_csv(out / PATIENT_PREDICTIONS_FILE, PatientPrediction)}

    client = DICOMwebClient(url=fresh_orthanc.dicomweb_url)
    found = client.search_for_series(search_filters={"Modality": "SR"})
    assert len(found) == len(studies)
    for item in found:
        study_uid, series_uid = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        assert item["0008103E"]["Value"][0] == SR_SERIES_DESCRIPTION
        (instance,) = client.search_for_instances(study_uid, series_uid)
        sr = client.retrieve_instance(study_uid, series_uid, instance["00080018"]["Value"][0])
        saved = tmp_path / "read-back" / f"{study_uid}.dcm"
        saved.parent.mkdir(exist_ok=True)
        sr.save_as(saved, enforce_file_format=True)
        report = read_study_report(saved)
        expected = decisions[patient_of_study[study_uid]]
        assert report["study_instance_uid"] == study_uid
        assert report["finding"] == finding_concept(expected.decision)
        assert report["probability"] == pytest.approx(expected.prob_positive, abs=1e-6)
        assert report["threshold"] == pytest.approx(expected.threshold)
        assert report["algorithm"][0] == f"ctcompare {SHIPPED_ARM} (fp32)"
        instances = sorted(str(ds.SOPInstanceUID) for ds in sources.values() if str(ds.StudyInstanceUID) == study_uid)
        assert report["referenced_sop_instance_uids"] == instances
        assert sorted(sop for _, sop in report["evidence"]) == instances
        assert str(sr.PatientID) == str(next(ds.PatientID for ds in sources.values()
                                             if str(ds.StudyInstanceUID) == study_uid))

    overlays = client.search_for_series(search_filters={"Modality": "OT"})
    assert sorted(item["0020000D"]["Value"][0] for item in overlays) == sorted(studies)
    for item in overlays:
        study_uid, series_uid = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        (instance,) = client.search_for_instances(study_uid, series_uid)
        image = client.retrieve_instance(study_uid, series_uid, instance["00080018"]["Value"][0])
        assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "not for diagnosis" in image.SeriesDescription
        assert image.pixel_array.shape == (48, 48, 3)
        assert image.SourceImageSequence[0].ReferencedSOPInstanceUID in {
            str(ds.SOPInstanceUID) for ds in sources.values() if str(ds.StudyInstanceUID) == study_uid}
