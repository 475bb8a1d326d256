"""`ctcompare ingest`: its parser and argument checks; flows.ingest (Prefect, torch, pydicom) is imported only once
the arguments parse."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.cli.errors import EXIT_FAILED, UsageError
from flows.parameters import (
    AllowBurnedIn,
    DaskAddress,
    DatasetFolder,
    DicomFolder,
    IngestLabels,
    IngestSize,
    Window,
    Workers,
    check_flow_parameters,
    help_for,
)

DESCRIPTION = "Turn a folder of DICOM CT files into a pseudonymized, schema-validated tensor dataset."


def ingest_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The ingest flow's parameters from the command line, checked against the flow's signature, the folders and
    the labels file: UsageError (one sentence) before Prefect starts and before any folder is made."""
    from flows.ingest import check_ingest_arguments, ingest_flow
    from tasks.ingest.labels import read_labels

    parameters = {"src_dir": args.src_dir, "out_dir": args.out, "labels": args.labels, "size": args.size,
                  "window": args.window, "workers": args.workers, "dask_address": args.dask_address,
                  "allow_burned_in": args.allow_burned_in}
    try:
        # the folders and the window first: parse_window's sentence lists the valid windows
        check_ingest_arguments(Path(args.src_dir).resolve(), Path(args.out).resolve(),
                               Path(args.labels) if args.labels else None, args.window)
        check_flow_parameters(ingest_flow, parameters, {"src_dir": "SRC_DIR", "out_dir": "--out"})
        if args.labels:
            read_labels(Path(args.labels))
    except ValueError as error:
        raise UsageError(str(error)) from None
    return parameters


def _run_ingest(args: argparse.Namespace) -> int:
    from flows.ingest import ingest_flow
    from tasks.ingest.errors import IngestError

    parameters = ingest_parameters(args)
    try:
        summary = ingest_flow(**parameters)
    except IngestError as error:
        print(f"ctcompare ingest: {error}")
        return EXIT_FAILED
    card = summary["card"]
    state = "unchanged" if summary["skipped"] else "written"
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
    parser.add_argument("src_dir", metavar="SRC_DIR", help=help_for(DicomFolder))
    parser.add_argument("--out", required=True, help=help_for(DatasetFolder))
    parser.add_argument("--labels", help=help_for(IngestLabels))
    parser.add_argument("--size", type=int, default=224, help=help_for(IngestSize, 224))
    parser.add_argument("--window", default="lung", help=help_for(Window, "lung"))
    parser.add_argument("--workers", type=int, default=0, help=help_for(Workers, 0))
    parser.add_argument("--dask-address", default=None, help=help_for(DaskAddress))
    parser.add_argument("--allow-burned-in", action="store_true", help=help_for(AllowBurnedIn))
    parser.set_defaults(handler=_run_ingest)
