"""The synth flow: a synthetic chest-CT demo cohort (real DICOM files, labels.csv, lesions.csv); its command:
flows/cli/synth.py."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.parameters import CohortFolder, CohortSeed, MatrixSizes, Patients, SlicesPerPatient
from tasks.demo.synth import (
    DEFAULT_MATRIX_SIZES,
    CohortSummary,
    synthesize_cohort,
    write_patient_batch_task,
)


@flow(name="synth", log_prints=False)
def synth_flow(out_dir: CohortFolder, patients: Patients = 150, slices_per_patient: SlicesPerPatient = 10,
               seed: CohortSeed = 0, matrix_sizes: MatrixSizes = None) -> CohortSummary:
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
