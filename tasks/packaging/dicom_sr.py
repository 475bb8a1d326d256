"""A model's predictions as DICOM Structured Reports, one per study, to be stored back in the hospital's archive.

Each report is a Comprehensive SR holding a TID 1500 Measurement Report (highdicom): one measurement group whose
finding is a coded concept (the decided class), with the study's probability of the positive class (its slices'
probabilities aggregated as the package says), the operating threshold, the model's name and version (TID 4019
algorithm identification, and the device observer), and references to every source image; the evidence sequence
lists the source series and instances. The series says it is a derived result, not for diagnosis.

These objects carry the source study's real identifiers (patient, study, UIDs): they are written under PRED_DIR's
private/ folder (owner-only) and sent to the archive they came from, never into a shareable folder.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from data_schemas.dataset import PRIVATE_INDEX_FILE, PrivateIndexRow
from data_schemas.files import atomic_write_bytes, read_models_csv
from data_schemas.package import (
    PREDICT_DATASET_DIR,
    PREDICTIONS_FILE,
    ImagePrediction,
    ModelPackageMeta,
)
from tasks.packaging.package import load_package

SR_DIR = "private/dicom-sr"  # under PRED_DIR: owner-only, like every file naming a patient
SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "ctcompare AI result - derived, not for diagnosis"
PRIVATE_FILE_MODE = 0o600
# Private coding scheme (a "99" prefix, DICOM PS3.16 section 8.2) for concepts without a standard code.
CODING_SCHEME = "99CTCOMPARE"

FINDING = codes.DCM.Finding
ALGORITHM_NAME, ALGORITHM_VERSION = codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion
NO_UNITS = codes.UCUM.NoUnits
PROCEDURE = codes.LN.CTUnspecifiedBodyRegion
PROBABILITY = hd.sr.CodedConcept("CTC001", CODING_SCHEME, "Model probability of the positive class")
THRESHOLD = hd.sr.CodedConcept("CTC002", CODING_SCHEME, "Operating threshold")
# Class names with a standard code; any other class gets a private code carrying its name.
KNOWN_FINDINGS: dict[str, hd.sr.CodedConcept] = {
    "nodule": hd.sr.CodedConcept("27925004", "SCT", "Nodule"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
}


def finding_concept(label: str) -> hd.sr.CodedConcept:
    """The coded concept of a class name: SNOMED CT where known, else a private code holding the name."""
    known = KNOWN_FINDINGS.get(label.strip().lower())
    return known if known is not None else hd.sr.CodedConcept(label[:16].upper(), CODING_SCHEME, label[:64])


def _ctcompare_version() -> str:
    try:
        return version("ctcompare")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class StudyResult:
    """One study's images and the model's result on them.

    Args:
        headers: the source instances' headers (no pixels), one per file.
        frames: (SOP Instance UID, 1-based frame number or None) of every predicted image.
        probability: the study's probability of the positive class (aggregated).
        decision: the decided class.
    """

    headers: list[pydicom.Dataset]
    frames: list[tuple[str, int | None]]
    probability: float
    decision: str


def model_identity(meta: ModelPackageMeta, package_sha256: str) -> tuple[str, str]:
    """(name, version) of a packaged model as the reports state it."""
    name = f"ctcompare {meta.arm} ({meta.weights_variant})"
    return name, f"ctcompare {_ctcompare_version()}, package {package_sha256[:16]}"


def study_report(result: StudyResult, meta: ModelPackageMeta, package_sha256: str) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR (TID 1500) of one study; its UIDs derive from the study and the package, so the same
    model on the same study gives the same SOP Instance UID (a re-send replaces, never duplicates)."""
    study_uid = str(result.headers[0].StudyInstanceUID)
    name, model_version = model_identity(meta, package_sha256)
    threshold = meta.operating_point.threshold
    algorithm = hd.sr.AlgorithmIdentification(
        name=name, version=model_version,
        parameters=[f"threshold={threshold:.6g}", f"aggregation={meta.operating_point.aggregation}"],
    )
    sop_classes = {str(h.SOPInstanceUID): str(h.SOPClassUID) for h in result.headers}
    images = [hd.sr.SourceImageForMeasurement(sop_classes[sop], sop, [frame] if frame else None)
              for sop, frame in result.frames]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[study_uid, package_sha256, "group"]),
            identifier="ctcompare study classification"),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(result.probability, 6), unit=NO_UNITS,
                              algorithm_id=algorithm, referenced_images=images),
            hd.sr.Measurement(name=THRESHOLD, value=round(threshold, 6), unit=NO_UNITS, algorithm_id=algorithm),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, finding_concept(result.decision))],
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[package_sha256, "device"]), name=name[:64], manufacturer_name="ctcompare",
        model_name=meta.arm[:64],
    )
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=PROCEDURE,
                                     imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(
        evidence=result.headers, content=report[0],
        series_instance_uid=generate_uid(entropy_srcs=[study_uid, package_sha256, "series"]),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(entropy_srcs=[study_uid, package_sha256, "sr"]),
        instance_number=1, manufacturer="ctcompare", is_complete=True, is_final=False, is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
    )


def study_results(meta: ModelPackageMeta, predictions: list[ImagePrediction], index: list[PrivateIndexRow],
                  source_dir: Path) -> list[StudyResult]:
    """Predictions grouped by study through the dataset's private index (image key -> source file and frame);
    each study's probability aggregated over its images as the package aggregates a patient's."""
    by_key = {row.image_key: row for row in index}
    reduce = np.max if meta.operating_point.aggregation == "max" else np.mean
    headers: dict[str, pydicom.Dataset] = {}
    studies: dict[str, list[tuple[pydicom.Dataset, int, float]]] = defaultdict(list)
    for prediction in predictions:
        row = by_key[prediction.image_key]
        if row.relative_path not in headers:
            headers[row.relative_path] = pydicom.dcmread(source_dir / row.relative_path, stop_before_pixels=True)
        header = headers[row.relative_path]
        studies[str(header.StudyInstanceUID)].append((header, row.frame, prediction.prob_positive))
    results = []
    for study_uid in sorted(studies):
        items = studies[study_uid]
        probability = float(reduce([p for _, _, p in items]))
        unique = {str(h.SOPInstanceUID): h for h, _, _ in items}
        frames = [(str(h.SOPInstanceUID), frame + 1 if int(getattr(h, "NumberOfFrames", 1) or 1) > 1 else None)
                  for h, frame, _ in items]
        decision = meta.positive_label if probability >= meta.operating_point.threshold else meta.classes[0]
        results.append(StudyResult(headers=[unique[k] for k in sorted(unique)], frames=sorted(set(frames)),
                                   probability=probability, decision=decision))
    return results


def write_study_reports(package_path: Path, pred_dir: Path, source_dir: Path) -> list[Path]:
    """One SR per study of a predict run (PRED_DIR/predictions.csv, its dataset's private index, the source folder),
    written owner-only under PRED_DIR/private/dicom-sr/; returns their paths."""
    package = load_package(package_path)
    predictions = read_models_csv(pred_dir / PREDICTIONS_FILE, ImagePrediction)
    index = read_models_csv(pred_dir / PREDICT_DATASET_DIR / PRIVATE_INDEX_FILE, PrivateIndexRow)
    folder = pred_dir / SR_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (pred_dir / "private").chmod(0o700)
    paths = []
    for result in study_results(package.meta, predictions, index, Path(source_dir)):
        report = study_report(result, package.meta, package.sha256)
        path = folder / f"{report.SOPInstanceUID}.dcm"
        buffer = BytesIO()
        report.save_as(buffer, enforce_file_format=True)
        atomic_write_bytes(path, buffer.getvalue(), mode=PRIVATE_FILE_MODE)
        paths.append(path)
    return paths


def _content_item(container: Sequence[pydicom.Dataset], concept: Code) -> pydicom.Dataset | None:
    """The first content item named `concept` under a content sequence (depth first), None when there is none."""
    for item in container:
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        if name is not None and (name.CodeValue, name.CodingSchemeDesignator) == (concept.value,
                                                                                   concept.scheme_designator):
            return item
        found = _content_item(item.ContentSequence, concept) if "ContentSequence" in item else None
        if found is not None:
            return found
    return None


def read_study_report(path: Path) -> dict[str, object]:
    """What a report says, read back with highdicom: finding, probability, threshold, model, referenced images and
    the evidence ((series, SOP instance UID) of every source instance)."""
    document = hd.sr.srread(path)
    group = hd.sr.MeasurementReport.from_sequence(document.content).get_image_measurement_groups()[0]
    measurements = {m.name.meaning: m for m in group.get_measurements()}
    probability = measurements[PROBABILITY.meaning]
    return {
        "study_instance_uid": str(document.StudyInstanceUID),
        "finding": hd.sr.CodedConcept.from_dataset(_content_item(group, FINDING).ConceptCodeSequence[0]),
        "probability": float(probability.value),
        "threshold": float(measurements[THRESHOLD.meaning].value),
        "algorithm": tuple(str(_content_item(group, name).TextValue) for name in (ALGORITHM_NAME, ALGORITHM_VERSION)),
        "referenced_sop_instance_uids": sorted(str(item.referenced_sop_instance_uid)
                                               for item in probability.referenced_images),
        "evidence": sorted((str(series), str(sop)) for _, series, sop, _ in document.get_evidence()),
    }


def send_reports(url: str, paths: list[Path], secret_block: str | None = None) -> int:
    """Store the reports in the archive with STOW-RS; returns how many were sent (DicomWebError on failure)."""
    from tasks.ingest.dicomweb import describe_failure, open_client

    if not paths:
        return 0
    client = open_client(url, secret_block)
    try:
        client.store_instances([pydicom.dcmread(path) for path in paths])
    except Exception as error:  # noqa: BLE001 - every failure becomes one sentence naming the URL
        raise describe_failure(url, error, "storing the reports") from None
    return len(paths)


@task(name="write-dicom-sr", cache_policy=NO_CACHE)
def write_study_reports_task(package_path: Path, pred_dir: Path, source_dir: Path) -> list[Path]:
    """One DICOM SR per predicted study, into PRED_DIR's private folder."""
    return write_study_reports(package_path, pred_dir, source_dir)


def _retry_if_it_may_help(task: object, task_run: object, state: object) -> bool:
    from tasks.ingest.dicomweb import retry_when_it_may_help

    return retry_when_it_may_help(task, task_run, state)  # type: ignore[arg-type]


@task(name="send-dicom-sr", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 45],
      retry_condition_fn=_retry_if_it_may_help)
def send_reports_task(url: str, paths: list[Path], secret_block: str | None = None) -> int:
    """STOW-RS the reports to the archive."""
    return send_reports(url, paths, secret_block)
