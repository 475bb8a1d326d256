"""`ctcompare ingest`: its parser and argument checks; flows.ingest (Prefect, torch, pydicom) is imported only once
the arguments parse."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from data_schemas.files import printable_path
from flows.cli.checks import check_dask_address
from flows.cli.errors import EXIT_FAILED, UsageError
from flows.parameters import (
    Accession,
    AllowBurnedIn,
    CredentialsBlock,
    DaskAddress,
    DatasetFolder,
    DicomFolder,
    FetchThreads,
    IngestLabels,
    IngestSize,
    Modality,
    StudyDate,
    StudyUidsFile,
    Window,
    Workers,
    check_flow_parameters,
    help_for,
)

DESCRIPTION = ("Turn a folder of DICOM CT files, or the CT studies of a DICOMweb archive (a PACS), into a "
               "pseudonymized, schema-validated tensor dataset.")


def dicomweb_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The DICOMweb ingest flow's parameters (SRC is a URL), checked like the folder ingest's: UsageError (one
    sentence) before any request and before any folder is made."""
    from flows.ingest import check_dicomweb_arguments, ingest_dicomweb_flow
    from tasks.ingest.dicomweb import keyed_on_accession
    from tasks.ingest.labels import read_labels

    parameters = {"url": args.src_dir, "out_dir": args.out, "study_date": args.study_date, "modality": args.modality,
                  "accession": args.accession, "study_uids_file": args.study_list, "labels": args.labels,
                  "size": args.size, "window": args.window, "workers": args.workers,
                  "allow_burned_in": args.allow_burned_in, "credentials_block": args.credentials_block,
                  "fetch_threads": args.fetch_threads}
    try:
        check_dicomweb_arguments(args.src_dir, Path(args.out).resolve(), study_date=args.study_date,
                                 modality=args.modality, accession=args.accession, study_uids_file=args.study_list,
                                 labels=Path(args.labels) if args.labels else None, window=args.window)
        check_flow_parameters(ingest_dicomweb_flow, parameters, {"url": "SRC", "out_dir": "--out",
                                                                 "study_uids_file": "--study-list"})
        if args.labels and not keyed_on_accession(Path(args.labels)):
            read_labels(Path(args.labels))
    except ValueError as error:
        raise UsageError(str(error)) from None
    return parameters


def ingest_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The ingest flow's parameters from the command line, checked against the flow's signature, the folders and
    the labels file: UsageError (one sentence) before Prefect starts and before any folder is made."""
    from flows.ingest import check_ingest_arguments, ingest_flow
    from tasks.ingest.labels import check_labels_file

    # Printable text (\xNN for bytes that are not UTF-8): Prefect's parameters are JSON; the flow turns them back.
    parameters = {"src_dir": printable_path(args.src_dir), "out_dir": printable_path(args.out),
                  "labels": printable_path(args.labels) if args.labels else None, "size": args.size,
                  "window": args.window, "workers": args.workers, "dask_address": args.dask_address,
                  "allow_burned_in": args.allow_burned_in}
    try:
        # the folders and the window first: parse_window's sentence lists the valid windows
        check_ingest_arguments(Path(args.src_dir).resolve(), Path(args.out).resolve(),
                               Path(args.labels) if args.labels else None, args.window)
        check_flow_parameters(ingest_flow, parameters, {"src_dir": "SRC_DIR", "out_dir": "--out"})
        if args.labels:  # the file, then its keys against the headers (no pixel decoded)
            check_labels_file(Path(args.labels), Path(args.src_dir).resolve())
        check_dask_address(args.dask_address)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return parameters


def _run_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest_dicomweb_flow, ingest_flow
    from tasks.ingest.dicomweb import is_dicomweb_url
    from tasks.ingest.errors import IngestError

    from_archive = is_dicomweb_url(args.src_dir)
    parameters = dicomweb_parameters(args) if from_archive else ingest_parameters(args)
    try:
        summary = (ingest_dicomweb_flow if from_archive else ingest_flow)(**parameters)
    except IngestError as error:  # DicomWebError (a ValueError) ends in the dispatcher's one sentence
        print(f"ctcompare ingest: {error}")
        return EXIT_FAILED
    card = summary["card"]
    state = "unchanged" if summary["skipped"] else "written"
    if from_archive:
        counts = summary["archive"]
        print(f"Archive: {counts['found']} instance(s) match, {counts['fetched']} fetched, "
              f"{counts['already']} already in the dataset's mirror")
    print(
        f"Dataset {state}: {summary['dataset_dir']} - {card['n_images']} images from {card['n_patients']} patients; "
        f"{card['n_files_quarantined']} of {card['n_files_seen']} files quarantined (see private/quarantine.csv); "
        f"labels: {card['label_distribution'] or 'none'}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare ingest`."""
    parser = subparsers.add_parser("ingest", help="DICOM folder -> pseudonymized tensor dataset",
                                   description=DESCRIPTION)
    parser.add_argument("src_dir", metavar="SRC", help=help_for(DicomFolder) + "; or a DICOMweb base URL "
                        "(http://host:port/dicom-web) whose studies the archive options select")
    parser.add_argument("--out", required=True, help=help_for(DatasetFolder))
    parser.add_argument("--labels", help=help_for(IngestLabels))
    parser.add_argument("--size", type=int, default=224, help=help_for(IngestSize, 224))
    parser.add_argument("--window", default="lung", help=help_for(Window, "lung"))
    parser.add_argument("--workers", type=int, default=0, help=help_for(Workers, 0))
    parser.add_argument("--dask-address", default=None, help=help_for(DaskAddress))
    parser.add_argument("--allow-burned-in", action="store_true", help=help_for(AllowBurnedIn))
    add_archive_options(parser)
    parser.add_argument("--fetch-threads", type=int, default=4, help=help_for(FetchThreads, 4))
    parser.set_defaults(handler=_run_ingest)


def add_archive_options(parser: argparse.ArgumentParser) -> None:
    """The study filters and credentials of a DICOMweb source (ingest and predict)."""
    group = parser.add_argument_group("DICOMweb source (when the source is a URL)")
    group.add_argument("--study-date", default="yesterday", help=help_for(StudyDate, "yesterday"))
    group.add_argument("--modality", default="CT", help=help_for(Modality, "CT"))
    group.add_argument("--accession", default=None, help=help_for(Accession))
    group.add_argument("--study-list", default=None, metavar="FILE", help=help_for(StudyUidsFile))
    group.add_argument("--credentials-block", default=None, metavar="NAME", help=help_for(CredentialsBlock))
