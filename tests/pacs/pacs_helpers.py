"""Shared by the PACS tests: a small synthetic cohort and its upload to an archive with STOW-RS."""

from __future__ import annotations

from pathlib import Path

import pydicom

from tasks.demo.synth import synthesize_cohort

PATIENTS, SLICES, MATRIX = 6, 2, 64


def small_cohort(folder: Path, seed: int = 3) -> Path:
    """A synthetic cohort of 6 patients, 2 slices of 64 px each (real DICOM, mixed transfer syntaxes)."""
    synthesize_cohort(folder, patients=PATIENTS, slices_per_patient=SLICES, seed=seed, matrix_sizes=[MATRIX])
    return folder


def dicom_files(folder: Path) -> list[Path]:
    return sorted(path for path in (folder / "dicom").rglob("*") if path.is_file())


def upload(dicomweb_url: str, paths: list[Path]) -> None:
    """STOW-RS every file to the archive."""
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(url=dicomweb_url).store_instances([pydicom.dcmread(path) for path in paths])


def study_dates(paths: list[Path]) -> dict[Path, str]:
    """Each file's StudyDate."""
    return {path: str(pydicom.dcmread(path, stop_before_pixels=True).StudyDate) for path in paths}
