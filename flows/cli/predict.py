"""`ctcompare predict PACKAGE_OR_RUN_DIR DICOM_DIR --out PRED_DIR`: its parser and argument checks; the predict flow
(Prefect, torch) is imported once the arguments parse."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from flows.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from flows.cli.ingest import add_archive_options
from flows.parameters import (
    BatchSize,
    DicomSource,
    Overlay,
    PackagePath,
    Precision,
    PredictionsFolder,
    PredictLabels,
    PredictSize,
    PredictWindow,
    SendUrl,
    check_flow_parameters,
    help_for,
)

DESCRIPTION = ("Predict new DICOM files (a folder, or the studies of a DICOMweb archive) with a model package, "
               "converted with exactly the package's recipe; one DICOM SR per study, sent back with --send.")


class _RunLinesOffTerminal(logging.Filter):
    """Keeps the flow's and tasks' own log lines below ERROR off the terminal (the Prefect UI still gets each one):
    `ctcompare predict` prints its warnings and its one-line summary itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))


@contextlib.contextmanager
def _quiet_terminal() -> Iterator[None]:
    """_RunLinesOffTerminal on the console handlers (the root logger's stream handlers) while predict runs."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)]
    quiet = _RunLinesOffTerminal()
    for handler in handlers:
        handler.addFilter(quiet)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


def _run_predict(args: argparse.Namespace) -> int:
    """`ctcompare predict`: refuse bad arguments as one sentence (exit 2), run the flow, print one summary line."""
    from flows.ingest import check_dicomweb_arguments
    from flows.predict import check_predict_arguments, predict_flow
    from tasks.ingest.dicomweb import check_dicomweb_url, is_dicomweb_url
    from tasks.ingest.errors import IngestError
    from tasks.ingest.labels import check_labels_file

    out = Path(args.out).resolve()
    from_archive = is_dicomweb_url(args.dicom_dir)
    parameters = {
        "package": args.package, "dicom_dir": args.dicom_dir, "out_dir": str(out), "labels": args.labels,
        "window": args.window, "size": args.size, "batch_size": args.batch_size, "precision": args.precision,
        "study_date": args.study_date, "modality": args.modality, "accession": args.accession,
        "study_uids_file": args.study_list, "send_url": args.send, "credentials_block": args.credentials_block,
        "overlay": args.overlay,
    }
    labels = Path(args.labels) if args.labels else None
    try:
        check_flow_parameters(predict_flow, parameters, {"package": "PACKAGE_OR_RUN_DIR", "dicom_dir": "SOURCE",
                                                         "out_dir": "--out", "study_uids_file": "--study-list",
                                                         "send_url": "--send"})
        checked = check_predict_arguments(Path(args.package), None if from_archive else Path(args.dicom_dir).resolve(),
                                          out, labels=labels, window=args.window, size=args.size)
        if from_archive:
            check_dicomweb_arguments(args.dicom_dir, out, study_date=args.study_date, modality=args.modality,
                                     accession=args.accession, study_uids_file=args.study_list, labels=labels,
                                     window=checked["window"])
        if args.send:
            check_dicomweb_url(args.send)
        if labels is not None and not from_archive:  # the file, then its keys against the headers, as in ingest
            check_labels_file(labels, Path(args.dicom_dir).resolve())
    except ValueError as error:  # PackageError and RecipeConflict are ValueErrors
        raise UsageError(str(error)) from None
    try:
        with _quiet_terminal():
            result = predict_flow(**parameters)
    except (IngestError, ValueError) as error:  # DicomWebError is a ValueError: one sentence naming URL and status
        print(f"ctcompare predict: {str(error).splitlines()[0]}")
        return EXIT_FAILED
    summary = result["summary"]
    for warning in summary["warnings"]:
        print(f"Warning: {warning}", file=sys.stderr)
    sent = f", {result['sent']} sent to {args.send}" if args.send else ""
    print(
        f"Predicted {summary['n_images']} images of {summary['n_patients']} patients "
        f"({summary['n_positive_patients']} positive at threshold {summary['threshold']:.3f}); "
        f"{summary['n_files_quarantined']} of {summary['n_files_seen']} files quarantined (see quarantine.csv); "
        f"{len(result['reports'])} DICOM object(s) (an SR per study, overlays with --overlay) in private/{sent} -> "
        f"{out / 'predictions.csv'} (patient identifiers: owner-only)", flush=True,
    )
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare predict`."""
    parser = subparsers.add_parser("predict", help="run a model package on new DICOM files",
                                   description=DESCRIPTION)
    parser.add_argument("package", metavar="PACKAGE_OR_RUN_DIR", help=help_for(PackagePath))
    parser.add_argument("dicom_dir", metavar="SOURCE", help=help_for(DicomSource))
    parser.add_argument("--out", required=True, metavar="PRED_DIR", help=help_for(PredictionsFolder))
    parser.add_argument("--labels", help=help_for(PredictLabels))
    parser.add_argument("--window", default=None, help=help_for(PredictWindow))
    parser.add_argument("--size", type=int, default=None, help=help_for(PredictSize))
    parser.add_argument("--batch-size", type=int, default=32, help=help_for(BatchSize, 32))
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help=help_for(Precision, "auto"))
    parser.add_argument("--send", default=None, metavar="URL", help=help_for(SendUrl))
    parser.add_argument("--overlay", action="store_true", help=help_for(Overlay))
    add_archive_options(parser)
    parser.set_defaults(handler=_run_predict)
