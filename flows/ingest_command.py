"""`ctcompare ingest`: its parser and handler, apart from the flow so that `--help` and a malformed argument
never import Prefect, torch or pydicom (flows.ingest is imported only once the arguments parse)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = "Turn a folder of DICOM CT files into a pseudonymized, schema-validated tensor dataset."


def _run_ingest(args: argparse.Namespace) -> int:
    from flows.cli import UsageError
    from flows.ingest import check_ingest_arguments, ingest_flow
    from tasks.ingest import IngestError, read_labels

    try:
        if args.workers < 0:
            raise ValueError(f"--workers must be 0 (all cores) or a number of processes, got {args.workers}.")
        check_ingest_arguments(Path(args.src_dir).resolve(), Path(args.out).resolve(), Path(args.labels) if args.labels else None, args.window)
        if args.labels:
            read_labels(Path(args.labels))
        if not 16 <= args.size <= 1024:
            raise ValueError(f"--size must be between 16 and 1024 pixels, got {args.size}.")
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        summary = ingest_flow(src_dir=args.src_dir, out_dir=args.out, labels=args.labels, size=args.size, window=args.window, workers=args.workers, dask_address=args.dask_address, allow_burned_in=args.allow_burned_in)
    except IngestError as error:
        print(f"ctcompare ingest: {error}")
        return 1
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
    parser = subparsers.add_parser("ingest", help="DICOM folder -> pseudonymized tensor dataset", description=DESCRIPTION)
    parser.add_argument("src_dir", help="folder of DICOM files (searched recursively, any extension)")
    parser.add_argument("--out", required=True, help="dataset folder to write (re-running into it is incremental)")
    parser.add_argument("--labels", help="CSV with one key column (patient_id, study_instance_uid, series_instance_uid, sop_instance_uid or path) and 'label'")
    parser.add_argument("--size", type=int, default=224, help="output size in pixels (default 224)")
    parser.add_argument("--window", default="lung", help="lung, mediastinal, bone, none, or LEVEL,WIDTH in HU (default lung)")
    parser.add_argument("--workers", type=int, default=0, help="parallel worker processes (default: all cores)")
    parser.add_argument("--dask-address", default=None, help="run the decode chunks on this Dask scheduler (e.g. tcp://host:8786)")
    parser.add_argument("--allow-burned-in", action="store_true", help="include files marked BurnedInAnnotation YES and Secondary Capture objects (their pixels may show names); quarantined by default")
    parser.set_defaults(handler=_run_ingest)
