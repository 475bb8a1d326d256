"""The predict flow: run a shipped model on new DICOM files (its command: flows/cli/predict.py).

Outline: check the request against the package's recipe (one sentence, before any work) -> ingest the new files
into PRED_DIR/dataset with the package's window and size (the ordinary ingest flow, as a subflow: same validation,
quarantine, pseudonymization and conversion) -> predict -> predictions.csv, patient_predictions.csv, quarantine.csv,
predict.json (data_schemas/package.py). The training dataset is never needed. PRED_DIR is owner-only: its
predictions name the source files, their UIDs and PatientIDs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas.dataset import QUARANTINE_FILE
from data_schemas.package import PREDICT_DATASET_DIR
from flows.heartbeats import no_heartbeats
from flows.ingest import check_dicomweb_arguments, check_ingest_arguments, ingest_flow, mirror_archive
from flows.parameters import (
    Accession,
    BatchSize,
    CredentialsBlock,
    DicomSource,
    Modality,
    Overlay,
    PackagePath,
    Precision,
    PredictionsFolder,
    PredictLabels,
    PredictSize,
    PredictWindow,
    SendUrl,
    StudyDate,
    StudyUidsFile,
)
from tasks.ingest.dicomweb import check_dicomweb_url, is_dicomweb_url
from tasks.ingest.labels import read_labels
from tasks.packaging.dicom_overlay import write_study_overlays_task
from tasks.packaging.dicom_sr import send_reports_task, write_study_reports_task
from tasks.packaging.package import load_package
from tasks.packaging.predict import IDENTIFIER_DIR_MODE, check_request, predict_dataset_task, window_argument

PREDICT_QUARANTINE_FILE = "quarantine.csv"  # PRED_DIR/quarantine.csv (the dataset keeps its own under private/)


def check_predict_arguments(package: Path, dicom_dir: Path | None, out_dir: Path, *, labels: Path | None,
                            window: str | None, size: int | None) -> dict[str, Any]:
    """Load the package's metadata and refuse a request its recipe cannot serve; returns ingest's window and size.
    dicom_dir None: the source is an archive (check_dicomweb_arguments checks it)."""
    loaded = load_package(package)
    label_names = set(read_labels(labels).labels.values()) if labels is not None else None
    check_request(loaded.meta, window=window, size=size, label_names=label_names)
    recipe = loaded.meta.recipe
    window_text = window_argument(recipe.window)
    if dicom_dir is not None:
        check_ingest_arguments(dicom_dir, out_dir / PREDICT_DATASET_DIR, labels, window_text)
    return {"window": window_text, "size": recipe.ingest_image_size, "package_file": loaded.path}


def _copy_quarantine(out: Path) -> None:
    """PRED_DIR/quarantine.csv: the ingest's list of rejected files (private: paths), beside the predictions."""
    source = out / PREDICT_DATASET_DIR / QUARANTINE_FILE
    if source.is_file():
        target = out / PREDICT_QUARANTINE_FILE
        shutil.copyfile(source, target)
        target.chmod(0o600)  # paths may hold names: owner-only, like the dataset's private part


@flow(name="predict")
def predict_flow(
    package: PackagePath,
    dicom_dir: DicomSource,
    out_dir: PredictionsFolder,
    labels: PredictLabels = None,
    window: PredictWindow = None,
    size: PredictSize = None,
    batch_size: BatchSize = 32,
    precision: Precision = "auto",
    study_date: StudyDate = "yesterday",
    modality: Modality = "CT",
    accession: Accession = None,
    study_uids_file: StudyUidsFile = None,
    send_url: SendUrl = None,
    credentials_block: CredentialsBlock = None,
    overlay: Overlay = False,
) -> dict[str, Any]:
    """Predict new DICOM files (a folder, or the studies of a DICOMweb archive) with a model package, converted
    with exactly the package's recipe; one DICOM SR per study under PRED_DIR/private/, stored back with send_url."""
    logger = get_run_logger()
    out = Path(out_dir).resolve()
    if is_dicomweb_url(dicom_dir):  # the studies are mirrored into the prediction dataset's private folder
        base_url, query = check_dicomweb_arguments(
            dicom_dir, out / PREDICT_DATASET_DIR, study_date=study_date, modality=modality, accession=accession,
            study_uids_file=study_uids_file, labels=Path(labels) if labels else None, window=window or "lung")
        dicom_dir = str(mirror_archive(base_url, out / PREDICT_DATASET_DIR, query, credentials_block)[0])
    checked = check_predict_arguments(Path(package), Path(dicom_dir).resolve(), out,
                                      labels=Path(labels) if labels else None, window=window, size=size)
    out.mkdir(mode=IDENTIFIER_DIR_MODE, parents=True, exist_ok=True)
    out.chmod(IDENTIFIER_DIR_MODE)  # the predictions name patients: not a folder to share
    dataset_dir = out / PREDICT_DATASET_DIR
    try:
        with no_heartbeats():  # a subflow: the calling run has the heartbeat
            ingest_flow(src_dir=dicom_dir, out_dir=str(dataset_dir), labels=labels, size=checked["size"],
                        window=checked["window"], workers=0)  # ingest's own policy: a pool only for 32+ files
    finally:
        _copy_quarantine(out)
    summary = predict_dataset_task(checked["package_file"], dataset_dir, out, batch_size, precision,
                                   dicom_dir=Path(dicom_dir).resolve())
    for warning in summary.warnings:
        logger.warning("Warning: %s", warning)
    reports = write_study_reports_task(checked["package_file"], out, Path(dicom_dir).resolve())
    if overlay:  # after the SRs: a GradCAM secondary capture per study
        reports += write_study_overlays_task(checked["package_file"], out, Path(dicom_dir).resolve())
    sent = send_reports_task(check_dicomweb_url(send_url), reports, credentials_block) if send_url else 0
    logger.info("Wrote %d DICOM object(s) (SR, overlays) under private/; %d sent", len(reports), sent)
    logger.info("Predicted %d image(s) of %d patient(s); %d file(s) quarantined; %d patient(s) positive",
                summary.n_images, summary.n_patients, summary.n_files_quarantined, summary.n_positive_patients)
    create_markdown_artifact(
        key="ctcompare-predict-summary", description="Predictions on new files",
        markdown=(f"**{summary.arm}** ({summary.weights_variant}): {summary.n_images} images of {summary.n_patients} "
                  f"patients, {summary.n_positive_patients} positive at threshold {summary.threshold:.3f} "
                  f"({summary.aggregation} aggregation); {summary.n_files_quarantined} of {summary.n_files_seen} "
                  f"files quarantined."),
    )
    return {"out_dir": str(out), "summary": summary.model_dump(mode="json"), "reports": [str(p) for p in reports],
            "sent": sent}
