"""A synthetic chest-CT demo cohort written as real DICOM files, with per-patient "nodule" / "normal" labels.

Layout under OUT_DIR (see data_schemas/synth.py for the side files):
    dicom/<PatientID>/ST<study UID tail>/SE<series number>/IM0001.dcm   one study, one series per patient;
                                                                         some series have no .dcm extension
    labels.csv, lesions.csv (true nodule discs per slice), cohort.json, identifiers.json (PRIVATE)

The cohort is planned from the seed (tasks.demo.planning), rendered (tasks.demo.render) and written
(tasks.demo.dicom_writer) a batch of patients at a time; cohort.json records the parameters, so a complete cohort
with the same parameters is kept as it is and an interrupted one is started again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.uid import UID

from data_schemas.files import read_model_json, write_model_json, write_models_csv
from data_schemas.synth import (
    COHORT_CARD_FILE,
    DICOM_DIR,
    IDENTIFIERS_FILE,
    LABELS_FILE,
    CohortCard,
    IdentifiersFile,
    LabelRow,
    NoduleSummary,
    SynthParameters,
    ValueRange,
)
from data_schemas.visual import LESIONS_SIDECAR_FILE, LesionSidecarRow
from tasks.common.paths import refuse_non_folder
from tasks.demo.dicom_writer import write_patient_series
from tasks.demo.geometry import lesion_rows
from tasks.demo.patients import DEFAULT_MATRIX_SIZES, GENERATOR_VERSION, PatientPlan
from tasks.demo.planning import plan_cohort, validate_synth_parameters


@dataclass(frozen=True)
class CohortSummary:
    """What synthesize_cohort produced (or found already complete). `identifiers` is PRIVATE: never log it."""

    out_dir: Path
    dicom_dir: Path
    labels_path: Path
    identifiers_path: Path
    cohort_card_path: Path
    n_patients: int
    n_slices: int
    label_counts: dict[str, int]
    identifiers: list[str] = field(repr=False)
    skipped: bool  # True when an existing complete cohort with the same parameters was reused
    seconds: float

    def one_line(self) -> str:
        """A log-safe summary line (no identifiers)."""
        verb = "kept existing" if self.skipped else "wrote"
        labels = ", ".join(f"{n} {label}" for label, n in sorted(self.label_counts.items()))
        return (f"synth: {verb} {self.n_slices} CT slices of {self.n_patients} patients ({labels}) "
                f"in {self.dicom_dir} with labels in {self.labels_path.name} [{self.seconds:.1f} s]")


class CohortMismatchError(ValueError):
    """OUT_DIR already holds a synthetic cohort made with other parameters."""


def synth_parameters(patients: int, slices_per_patient: int, seed: int,
                     matrix_sizes: Sequence[int] = DEFAULT_MATRIX_SIZES) -> SynthParameters:
    return SynthParameters(patients=patients, slices_per_patient=slices_per_patient, seed=seed,
                           matrix_sizes=list(matrix_sizes), generator_version=GENERATOR_VERSION)


def existing_cohort_state(out_dir: Path, parameters: SynthParameters) -> str:
    """'absent', 'complete' (same parameters, all files there), 'incomplete' (same parameters) or 'different'."""
    card_path = Path(out_dir) / COHORT_CARD_FILE
    if not card_path.is_file():
        return "absent"
    try:
        card = read_model_json(card_path, CohortCard)
    except ValueError:
        return "different"
    if card.parameters != parameters:
        return "different"
    if not card.complete:
        return "incomplete"
    for name in (LABELS_FILE, LESIONS_SIDECAR_FILE, IDENTIFIERS_FILE):
        if not (Path(out_dir) / name).is_file():
            return "incomplete"
    dicom_files = sum(len(files) for _, _, files in os.walk(Path(out_dir) / DICOM_DIR))
    return "complete" if dicom_files == card.n_slices else "incomplete"


def check_output_dir(out_dir: Path, parameters: SynthParameters) -> str:
    """Validate OUT_DIR before any work; returns existing_cohort_state, raises CohortMismatchError/ValueError."""
    out_dir = Path(out_dir)
    refuse_non_folder(out_dir, "OUT_DIR")
    state = existing_cohort_state(out_dir, parameters)
    if state == "different":
        raise CohortMismatchError(
            f"{out_dir} already holds a synthetic cohort made with other parameters; remove it or choose another "
            "folder."
        )
    return state


def start_cohort(out_dir: Path, parameters: SynthParameters) -> Path:
    """Write an incomplete cohort.json first, so an interrupted run is recognised as this cohort, and make dicom/."""
    out_dir = Path(out_dir)
    dicom_dir = out_dir / DICOM_DIR
    if dicom_dir.exists() and existing_cohort_state(out_dir, parameters) == "incomplete":
        shutil.rmtree(dicom_dir)  # our own half-written tree: start clean so no stray file survives
    dicom_dir.mkdir(parents=True, exist_ok=True)
    write_model_json(out_dir / COHORT_CARD_FILE, CohortCard(complete=False, parameters=parameters))
    return dicom_dir


def finish_cohort(out_dir: Path, parameters: SynthParameters, plans: Sequence[PatientPlan]) -> CohortCard:
    """Write labels.csv, lesions.csv, identifiers.json and finally the complete cohort.json."""
    out_dir = Path(out_dir)
    write_models_csv(out_dir / LABELS_FILE, [LabelRow(patient_id=p.patient_id, label=p.label) for p in plans], LabelRow)
    write_models_csv(out_dir / LESIONS_SIDECAR_FILE, lesion_rows(plans), LesionSidecarRow)
    patients = [p.identifiers for p in plans]
    strings = set()
    for ids in patients:
        strings.update({ids.patient_id, ids.patient_name, ids.patient_birth_date, ids.accession_number, ids.study_id,
                        ids.institution_name, ids.referring_physician_name, ids.station_name})
    write_model_json(out_dir / IDENTIFIERS_FILE, IdentifiersFile(identifiers=sorted(strings), patients=patients))
    card = cohort_card(parameters, plans)
    write_model_json(out_dir / COHORT_CARD_FILE, card)
    return card


def cohort_card(parameters: SynthParameters, plans: Sequence[PatientPlan]) -> CohortCard:
    """Counts of a planned cohort (files, formats, scanners, nodules) for cohort.json."""
    per_file: dict[str, Counter[str]] = {k: Counter() for k in ("matrix", "syntax", "maker", "thickness")}
    for p in plans:
        per_file["matrix"][f"{p.matrix}x{p.matrix}"] += p.slices
        per_file["syntax"][UID(p.transfer_syntax).name] += p.slices
        per_file["maker"][p.scanner.manufacturer] += p.slices
        per_file["thickness"][f"{p.slice_thickness_mm:g}"] += p.slices
    nodules = [n for p in plans for n in p.nodules]
    spacings = [p.pixel_spacing_mm for p in plans]
    return CohortCard(
        complete=True,
        parameters=parameters,
        n_patients=len(plans),
        n_slices=sum(p.slices for p in plans),
        label_distribution=dict(sorted(Counter(p.label for p in plans).items())),
        matrix_sizes=dict(sorted(per_file["matrix"].items())),
        transfer_syntaxes=dict(sorted(per_file["syntax"].items())),
        manufacturers=dict(sorted(per_file["maker"].items())),
        slice_thickness_mm=dict(sorted(per_file["thickness"].items())),
        pixel_spacing_mm=ValueRange(min=min(spacings), max=max(spacings)),
        files_without_extension=sum(p.slices for p in plans if not p.file_extension),
        nodules=NoduleSummary(
            n_nodules=len(nodules),
            diameter_mm=ValueRange(min=min(n.diameter_mm for n in nodules), max=max(n.diameter_mm for n in nodules)),
            core_hu=ValueRange(min=min(n.core_hu for n in nodules), max=max(n.core_hu for n in nodules)),
        ) if nodules else None,
    )


def summarize_existing(out_dir: Path, seconds: float = 0.0) -> CohortSummary:
    """A CohortSummary of a complete cohort already on disk."""
    out_dir = Path(out_dir)
    card = read_model_json(out_dir / COHORT_CARD_FILE, CohortCard)
    identifiers = read_model_json(out_dir / IDENTIFIERS_FILE, IdentifiersFile)
    return _summary(out_dir, card, identifiers.identifiers, skipped=True, seconds=seconds)


def _summary(out_dir: Path, card: CohortCard, identifiers: list[str], skipped: bool, seconds: float) -> CohortSummary:
    return CohortSummary(
        out_dir=out_dir,
        dicom_dir=out_dir / DICOM_DIR,
        labels_path=out_dir / LABELS_FILE,
        identifiers_path=out_dir / IDENTIFIERS_FILE,
        cohort_card_path=out_dir / COHORT_CARD_FILE,
        n_patients=card.n_patients,
        n_slices=card.n_slices,
        label_counts=dict(card.label_distribution),
        identifiers=identifiers,
        skipped=skipped,
        seconds=seconds,
    )


def patient_batches(plans: Sequence[PatientPlan], batch_size: int = 10) -> list[list[PatientPlan]]:
    """Group patients so that one Prefect task run covers several series (task runs have overhead)."""
    return [list(plans[i:i + batch_size]) for i in range(0, len(plans), batch_size)]


def write_patient_batch(plans: Sequence[PatientPlan], dicom_dir: Path) -> int:
    """Write several patients' series; returns the number of files written."""
    return sum(len(write_patient_series(plan, dicom_dir)) for plan in plans)


def synthesize_cohort(out_dir: Path, patients: int = 150, slices_per_patient: int = 10, seed: int = 0,
                      matrix_sizes: Sequence[int] = DEFAULT_MATRIX_SIZES, *,
                      write_batch: Callable[[list[PatientPlan], Path], int] = write_patient_batch,
                      on_progress: Callable[[int, int], None] | None = None) -> CohortSummary:
    """Write a synthetic chest-CT cohort to out_dir, or reuse a complete one made with the same parameters.

    The one path: `synth_flow` calls this with write_batch=write_patient_batch_task (one Prefect task run per
    batch of patients) and on_progress logging (slices written, slices in total).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    validate_synth_parameters(patients, slices_per_patient, matrix_sizes)
    parameters = synth_parameters(patients, slices_per_patient, seed, matrix_sizes)
    if check_output_dir(out_dir, parameters) == "complete":
        return summarize_existing(out_dir, time.perf_counter() - started)
    plans = plan_cohort(patients, slices_per_patient, seed, matrix_sizes)
    dicom_dir = start_cohort(out_dir, parameters)
    written = 0
    for batch in patient_batches(plans):
        written += write_batch(batch, dicom_dir)
        if on_progress is not None:
            on_progress(written, patients * slices_per_patient)
    card = finish_cohort(out_dir, parameters, plans)
    return summarize_new(out_dir, card, time.perf_counter() - started)


def summarize_new(out_dir: Path, card: CohortCard, seconds: float) -> CohortSummary:
    """A CohortSummary of a cohort this run has just written."""
    identifiers = read_model_json(Path(out_dir) / IDENTIFIERS_FILE, IdentifiersFile).identifiers
    return _summary(Path(out_dir), card, identifiers, skipped=False, seconds=seconds)


# ----------------------------------------------------------------------------------------------- Prefect tasks


@task(name="write-patient-series", cache_policy=NO_CACHE)
def write_patient_batch_task(plans: list[PatientPlan], dicom_dir: Path) -> int:
    """Render and write a batch of patients' DICOM series."""
    return write_patient_batch(plans, dicom_dir)
