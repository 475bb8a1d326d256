"""`ctcompare synth OUT_DIR`: its parser and argument checks; a complete cohort with the same parameters is reported
without starting Prefect."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli.errors import EXIT_OK, UsageError
from flows.parameters import CohortFolder, CohortSeed, Patients, SlicesPerPatient, check_flow_parameters, help_for


def _run_synth(args: argparse.Namespace) -> int:
    """`ctcompare synth`: check the arguments, write (or keep) the cohort, print one line."""
    from flows.synth import synth_flow
    from tasks.demo.synth import (
        DEFAULT_MATRIX_SIZES,
        CohortMismatchError,
        check_output_dir,
        summarize_existing,
        synth_parameters,
        validate_synth_parameters,
    )

    # Validate before starting Prefect, so a bad argument costs nothing and reads as one sentence.
    try:
        check_flow_parameters(synth_flow, {"out_dir": str(args.out_dir), "patients": args.patients,
                                           "slices_per_patient": args.slices_per_patient, "seed": args.seed},
                              {"out_dir": "OUT_DIR"})
        validate_synth_parameters(args.patients, args.slices_per_patient, DEFAULT_MATRIX_SIZES)
        parameters = synth_parameters(args.patients, args.slices_per_patient, args.seed)
        state = check_output_dir(Path(args.out_dir), parameters)
    except (CohortMismatchError, ValueError) as error:
        raise UsageError(str(error)) from error
    if state == "complete":  # nothing to do: skip starting Prefect at all
        print(summarize_existing(Path(args.out_dir)).one_line())
        return EXIT_OK
    summary = synth_flow(out_dir=str(args.out_dir), patients=args.patients,
                         slices_per_patient=args.slices_per_patient, seed=args.seed)
    print(summary.one_line())
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare synth`."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic chest-CT demo cohort (DICOM + labels.csv + lesions.csv)",
        description="Write a realistic synthetic chest-CT cohort as DICOM files with fake identifiers, plus "
                    "labels.csv (patient_id,label: nodule/normal) and lesions.csv (true nodule discs per slice, "
                    "see docs/lesions.md). Deterministic for a given seed; an existing "
                    "complete cohort with the same parameters is kept.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help=help_for(CohortFolder))
    parser.add_argument("--patients", type=int, default=150, help=help_for(Patients, 150))
    parser.add_argument("--slices-per-patient", type=int, default=10, help=help_for(SlicesPerPatient, 10))
    parser.add_argument("--seed", type=int, default=0, help=help_for(CohortSeed, 0))
    parser.set_defaults(handler=_run_synth)
