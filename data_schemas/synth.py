"""Schemas of the files `ctcompare synth` writes into a synthetic cohort folder.

    dicom/            the CT slices (real DICOM files; headers carry fake identifiers)
    labels.csv        LabelRow per patient: patient_id (raw PatientID), label ("nodule" / "normal")
    lesions.csv       LesionSidecarRow (data_schemas/visual.py) per nodule cross-section: the true centre and
                      enclosing radius in the stored pixel grid, keyed by the file's path under dicom/
                      (docs/lesions.md); input-side like labels.csv, since the path starts with the PatientID
    cohort.json       CohortCard: parameters and counts, no identifiers; written last, marks a complete cohort
    identifiers.json  IdentifiersFile: PRIVATE, every fake identifier embedded in the headers, for leak tests
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data_schemas.base import StrictModel

SYNTH_SCHEMA_VERSION = "1.0"

DICOM_DIR = "dicom"
LABELS_FILE = "labels.csv"
COHORT_CARD_FILE = "cohort.json"
IDENTIFIERS_FILE = "identifiers.json"

LABEL_NODULE = "nodule"
LABEL_NORMAL = "normal"
SynthLabel = Literal["nodule", "normal"]


class LabelRow(StrictModel):
    """One row of labels.csv. Private: patient_id is the raw PatientID in the DICOM headers."""


    patient_id: str
    label: SynthLabel


class SynthParameters(StrictModel):
    """Everything that determines a cohort's bytes: equal parameters mean an identical cohort."""


    patients: int = Field(ge=2)
    slices_per_patient: int = Field(ge=1)
    seed: int
    matrix_sizes: list[int]
    generator_version: str


class ValueRange(StrictModel):
    """Smallest and largest value of one quantity over the cohort."""


    min: float
    max: float


class NoduleSummary(StrictModel):
    """Ground-truth nodule statistics, for judging how hard the task is."""


    n_nodules: int
    diameter_mm: ValueRange
    core_hu: ValueRange


class CohortCard(StrictModel):
    """cohort.json: how a synthetic cohort was made and what it holds. Shareable: no identifiers."""


    schema_version: Literal["1.0"] = SYNTH_SCHEMA_VERSION
    generator: str = "ctcompare.synth"
    complete: bool = Field(description="False while files are being written; True once every file is in place")
    parameters: SynthParameters
    n_patients: int = 0
    n_slices: int = 0
    label_distribution: dict[str, int] = Field(default_factory=dict, description="label -> patients")
    matrix_sizes: dict[str, int] = Field(default_factory=dict, description="'ROWSxCOLS' -> files")
    transfer_syntaxes: dict[str, int] = Field(default_factory=dict, description="transfer syntax name -> files")
    manufacturers: dict[str, int] = Field(default_factory=dict, description="manufacturer -> files")
    slice_thickness_mm: dict[str, int] = Field(default_factory=dict, description="thickness -> files")
    pixel_spacing_mm: ValueRange | None = None
    files_without_extension: int = 0
    nodules: NoduleSummary | None = None


class PatientIdentifiers(StrictModel):
    """The fake identifiers of one patient, exactly as written into the headers. Private."""


    patient_id: str
    patient_name: str
    patient_birth_date: str
    accession_number: str
    study_id: str
    institution_name: str
    referring_physician_name: str
    station_name: str
    study_instance_uid: str
    series_instance_uid: str


class IdentifiersFile(StrictModel):
    """identifiers.json: PRIVATE list of the identifier strings embedded in the cohort, for leak tests."""


    schema_version: Literal["1.0"] = SYNTH_SCHEMA_VERSION
    notice: str = "PRIVATE: fake identifiers embedded in the synthetic DICOM headers; no output may contain them."
    identifiers: list[str] = Field(description="sorted unique strings: names, IDs, birth dates, accession numbers")
    patients: list[PatientIdentifiers]
