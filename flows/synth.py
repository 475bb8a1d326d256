"""`ctcompare synth OUT_DIR`: write a synthetic chest-CT demo cohort (real DICOM files, labels.csv, lesions.csv)."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger

from flows.parameters import CohortFolder, MatrixSizes, Patients, Seed, SlicesPerPatient, check_flow_parameters, help_for

from tasks.demo.synth import (
    DEFAULT_MATRIX_SIZES,
    CohortMismatchError,
    CohortSummary,
    check_output_dir,
    summarize_existing,
    synth_parameters,
    synthesize_cohort,
    validate_synth_parameters,
    write_patient_batch_task,
)


@flow(name="synth", log_prints=False)
def synth_flow(out_dir: CohortFolder, patients: Patients = 150, slices_per_patient: SlicesPerPatient = 10,
               seed: Seed = 0, matrix_sizes: MatrixSizes = None) -> CohortSummary:
    """Write a synthetic cohort to out_dir; a complete cohort with the same parameters is kept as it is."""
    logger = get_run_logger()

    def log_progress(written: int, total: int) -> None:
        # Counts only: identifiers never go to the logs.
        logger.info("Wrote %d of %d slices.", written, total)

    summary = synthesize_cohort(Path(out_dir), patients, slices_per_patient, seed,
                                list(matrix_sizes or DEFAULT_MATRIX_SIZES),
                                write_batch=write_patient_batch_task, on_progress=log_progress)
    if summary.skipped:
        logger.info("Complete cohort with the same parameters found; nothing to do.")
    return summary


def _run_synth(args: argparse.Namespace) -> int:
    from flows.cli import UsageError

    # Validate before starting Prefect, so a bad argument costs nothing and reads as one sentence.
    try:
        check_flow_parameters(synth_flow, {"out_dir": str(args.out_dir), "patients": args.patients,
                                           "slices_per_patient": args.slices_per_patient, "seed": args.seed},
                              {"out_dir": "OUT_DIR"})
        validate_synth_parameters(args.patients, args.slices_per_patient, DEFAULT_MATRIX_SIZES)
        state = check_output_dir(Path(args.out_dir), synth_parameters(args.patients, args.slices_per_patient, args.seed))
    except (CohortMismatchError, ValueError) as error:
        raise UsageError(str(error)) from error
    if state == "complete":  # nothing to do: skip starting Prefect at all
        print(summarize_existing(Path(args.out_dir)).one_line())
        return 0
    summary = synth_flow(out_dir=str(args.out_dir), patients=args.patients,
                         slices_per_patient=args.slices_per_patient, seed=args.seed)
    print(summary.one_line())
    return 0


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
    parser.add_argument("--seed", type=int, default=0, help=help_for(Seed, 0))
    parser.set_defaults(handler=_run_synth)
