"""The demo: a synthetic CT cohort written as real DICOM files."""

from tasks.demo.synth import DEFAULT_MATRIX_SIZES, synthesize_cohort

__all__ = ["DEFAULT_MATRIX_SIZES", "synthesize_cohort"]
