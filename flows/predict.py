"""`ctcompare predict PACKAGE_OR_RUN_DIR DICOM_DIR --out PRED_DIR`: run a shipped model on new DICOM files.

Outline: check the request against the package's recipe (one sentence, before any work) -> ingest the new files
into PRED_DIR/dataset with the package's window and size (the ordinary ingest flow, as a subflow: same validation,
quarantine, pseudonymization and conversion) -> predict -> predictions.csv, patient_predictions.csv, quarantine.csv,
predict.json (data_schemas/package.py). The training dataset is never needed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from data_schemas.dataset import QUARANTINE_FILE
from data_schemas.package import PREDICT_DATASET_DIR

PREDICT_QUARANTINE_FILE = "quarantine.csv"  # PRED_DIR/quarantine.csv (the dataset keeps its own under private/)
from flows.ingest import check_ingest_arguments, ingest_flow
from flows.parameters import (
    BatchSize,
    DicomFolder,
    PackagePath,
    Precision,
    PredictionsFolder,
    PredictLabels,
    PredictSize,
    PredictWindow,
    check_flow_parameters,
    help_for,
)
from tasks.ingest.assemble import IngestError, read_labels
from tasks.packaging.package import load_package
from tasks.packaging.predict import check_request, predict_dataset_task, window_argument

def check_predict_arguments(package: Path, dicom_dir: Path, out_dir: Path, *, labels: Path | None,
                            window: str | None, size: int | None) -> dict[str, Any]:
    """Load the package's metadata and refuse a request its recipe cannot serve; returns ingest's window and size."""
    loaded = load_package(package)
    label_names = set(read_labels(labels).labels.values()) if labels is not None else None
    check_request(loaded.meta, window=window, size=size, label_names=label_names)
    recipe = loaded.meta.recipe
    window_text = window_argument(recipe.window)
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
    dicom_dir: DicomFolder,
    out_dir: PredictionsFolder,
    labels: PredictLabels = None,
    window: PredictWindow = None,
    size: PredictSize = None,
    batch_size: BatchSize = 32,
    precision: Precision = "auto",
) -> dict[str, Any]:
    """Predict new DICOM files with a model package, converted with exactly the package's recipe."""
    logger = get_run_logger()
    out = Path(out_dir).resolve()
    checked = check_predict_arguments(Path(package), Path(dicom_dir).resolve(), out,
                                      labels=Path(labels) if labels else None, window=window, size=size)
    dataset_dir = out / PREDICT_DATASET_DIR
    try:
        ingest_flow(src_dir=dicom_dir, out_dir=str(dataset_dir), labels=labels, size=checked["size"],
                    window=checked["window"], workers=0)  # ingest's own policy: a pool only for 32+ files
    finally:
        _copy_quarantine(out)
    summary = predict_dataset_task(checked["package_file"], dataset_dir, out, batch_size, precision)
    logger.info("Predicted %d image(s) of %d patient(s); %d file(s) quarantined; %d patient(s) positive",
                summary.n_images, summary.n_patients, summary.n_files_quarantined, summary.n_positive_patients)
    create_markdown_artifact(
        key="ctcompare-predict-summary", description="Predictions on new files",
        markdown=(f"**{summary.arm}** ({summary.weights_variant}): {summary.n_images} images of {summary.n_patients} "
                  f"patients, {summary.n_positive_patients} positive at threshold {summary.threshold:.3f} "
                  f"({summary.aggregation} aggregation); {summary.n_files_quarantined} of {summary.n_files_seen} "
                  f"files quarantined."),
    )
    return {"out_dir": str(out), "summary": summary.model_dump(mode="json")}


def _run_predict(args: argparse.Namespace) -> int:
    """`ctcompare predict`: refuse bad arguments as one sentence (exit 2), run the flow, print one summary line."""
    from flows.cli import UsageError

    out = Path(args.out).resolve()
    try:
        check_flow_parameters(predict_flow, {
            "package": args.package, "dicom_dir": args.dicom_dir, "out_dir": str(out), "labels": args.labels,
            "window": args.window, "size": args.size, "batch_size": args.batch_size, "precision": args.precision,
        }, {"package": "PACKAGE_OR_RUN_DIR", "dicom_dir": "DICOM_DIR", "out_dir": "--out"})
        check_predict_arguments(Path(args.package), Path(args.dicom_dir).resolve(), out,
                                labels=Path(args.labels) if args.labels else None, window=args.window, size=args.size)
    except ValueError as error:  # PackageError and RecipeConflict are ValueErrors
        raise UsageError(str(error)) from None
    try:
        result = predict_flow(package=args.package, dicom_dir=args.dicom_dir, out_dir=str(out), labels=args.labels,
                              window=args.window, size=args.size, batch_size=args.batch_size,
                              precision=args.precision)
    except (IngestError, ValueError) as error:
        print(f"ctcompare predict: {str(error).splitlines()[0]}")
        return 1
    summary = result["summary"]
    print(
        f"Predicted {summary['n_images']} images of {summary['n_patients']} patients "
        f"({summary['n_positive_patients']} positive at threshold {summary['threshold']:.3f}); "
        f"{summary['n_files_quarantined']} of {summary['n_files_seen']} files quarantined (see quarantine.csv) -> {out}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare predict`."""
    parser = subparsers.add_parser("predict", help="run a model package on new DICOM files",
                                   description=predict_flow.__doc__)
    parser.add_argument("package", metavar="PACKAGE_OR_RUN_DIR", help=help_for(PackagePath))
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", help=help_for(DicomFolder))
    parser.add_argument("--out", required=True, metavar="PRED_DIR", help=help_for(PredictionsFolder))
    parser.add_argument("--labels", help=help_for(PredictLabels))
    parser.add_argument("--window", default=None, help=help_for(PredictWindow))
    parser.add_argument("--size", type=int, default=None, help=help_for(PredictSize))
    parser.add_argument("--batch-size", type=int, default=32, help=help_for(BatchSize, 32))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help=help_for(Precision, "auto"))
    parser.set_defaults(handler=_run_predict)
