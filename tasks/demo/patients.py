"""The synthetic cohort's patients as data: scanners, names, and each patient's plan (drawn in tasks.demo.planning).

Everything is a pure function of (parameters, seed): UIDs come from generate_uid with seeded entropy and no
wall-clock value is written, so two runs with the same seed give byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from data_schemas.synth import PatientIdentifiers

# Bump when the rendering or header content changes: an existing cohort.json with another version is stale.
GENERATOR_VERSION = "2"

DEFAULT_MATRIX_SIZES: tuple[int, ...] = (512, 256)
MAX_PATIENTS = 20_000
MAX_SLICES_PER_PATIENT = 1_000
SLICE_THICKNESSES_MM = (1.0, 1.25, 2.5, 5.0)
POSITIVE_SHARE = 0.48  # "roughly balanced": a little under half the patients have nodules
RLE_SHARE = 0.2
JPEG2000_SHARE = 0.1
NO_EXTENSION_SHARE = 0.15  # PACS exports often have bare file names
LUNG_CRANIOCAUDAL_MM = 250.0  # z extent over which the lung cross-section grows and shrinks


@dataclass(frozen=True)
class ScannerProfile:
    """A fake scanner: header tags plus the noise and storage conventions its images get."""

    manufacturer: str
    model_name: str
    kvp: float
    convolution_kernel: str
    institution_name: str
    station_name: str
    noise_sigma_hu: float
    noise_correlation_px: float  # smoother kernels give more correlated noise
    pixel_representation: int  # 0: uint16, 1: int16
    bits_stored: int
    rescale_intercept: float
    outside_fov_hu: float | None  # value outside the reconstruction circle; None leaves air there


SCANNERS: tuple[ScannerProfile, ...] = (
    ScannerProfile("SIEMENS", "SOMATOM Definition AS+", 120.0, "B31f", "Riverside General Hospital",
                   "RIVERSIDE-CT2", 14.0, 0.9, 0, 12, -1024.0, None),
    ScannerProfile("GE MEDICAL SYSTEMS", "LightSpeed VCT", 120.0, "STANDARD", "St. Aldhelm University Clinic",
                   "ALDHELM-VCT1", 21.0, 0.7, 1, 16, -1024.0, -3024.0),
    ScannerProfile("Philips", "Brilliance 64", 100.0, "B", "Northgate Community Hospital",
                   "NORTHGATE-CT64", 27.0, 0.55, 0, 12, -1000.0, None),
)

FEMALE_FIRST_NAMES = ("JANE", "MARY", "ANNA", "LINDA", "SUSAN", "KAREN", "MARIA", "ELENA", "SOFIA", "GRACE",
                      "HELEN", "RUTH", "ALICE", "NORA", "IRIS", "CLARA")
MALE_FIRST_NAMES = ("JOHN", "JAMES", "ROBERT", "MICHAEL", "DAVID", "PETER", "THOMAS", "PAUL", "MARK", "GEORGE",
                    "HENRY", "ARTHUR", "LUCAS", "OSCAR", "VICTOR", "SAMUEL")
LAST_NAMES = ("DOE", "SMITH", "JOHNSON", "BROWN", "GARCIA", "MILLER", "DAVIS", "WILSON", "MOORE", "TAYLOR",
              "ANDERSON", "MARTIN", "WALKER", "HALL", "YOUNG", "KING", "WRIGHT", "LOPEZ", "HILL", "SCOTT",
              "GREEN", "ADAMS", "BAKER", "NELSON", "CARTER", "MITCHELL", "PEREZ", "ROBERTS", "OKAFOR", "NOVAK")
REFERRING_PHYSICIANS = ("HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES", "GREY^MEREDITH", "ROSS^DOUGLAS",
                        "CARTER^JOHN", "WELBY^MARCUS", "RIVIERA^NICK")


@dataclass(frozen=True)
class Nodule:
    """One lung nodule; position is normalised to its lung ellipse so it stays inside as the lung changes size."""

    side: int  # -1: patient's right lung (image left), +1: patient's left lung
    u: float  # x offset in units of the lung's x semi-axis
    v: float  # y offset in units of the lung's y semi-axis
    du_per_mm: float  # drift along z, in the same units
    dv_per_mm: float
    diameter_mm: float
    core_hu: float
    edge_mm: float  # soft margin: wider for ground-glass nodules
    aspect: float
    angle: float
    lobulation: float  # amplitude of the radius modulation, 0 = perfectly round
    lobes: int
    lobe_phase: float


@dataclass(frozen=True)
class VesselTubes:
    """Pulmonary vessels as tubes through z: each crosses the slices between z_center +- z_half_length_mm."""

    side: np.ndarray
    u: np.ndarray
    v: np.ndarray
    du_per_mm: np.ndarray
    dv_per_mm: np.ndarray
    z_center_mm: np.ndarray
    z_half_length_mm: np.ndarray
    radius_mm: np.ndarray
    aspect: np.ndarray
    peak_hu: np.ndarray  # below soft tissue for thin vessels: partial volume with the surrounding lung


@dataclass(frozen=True)
class PatientPlan:
    """Everything needed to render and write one patient's series, drawn up front from the seed."""

    index: int
    seed: int
    label: str
    identifiers: PatientIdentifiers
    patient_sex: str
    patient_age: str
    study_date: str
    study_time: str
    frame_of_reference_uid: str
    series_number: int
    scanner_index: int
    matrix: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    slices: int
    transfer_syntax: str
    file_extension: str
    body_half_width_mm: float
    body_half_depth_mm: float
    body_center_y_mm: float
    fat_mm: float
    z_start_mm: float  # table position of the first slice
    z_start_frac: float  # where the first slice sits between lung apex (0) and base (1)
    lung_hu: float
    lung_texture_hu: float
    texture_offset: tuple[int, int]
    rib_angles: np.ndarray  # radians, at the first slice
    rib_drift_per_mm: np.ndarray
    rib_size_mm: np.ndarray  # (n, 2) tangential and radial semi-axes
    vessels: VesselTubes
    nodules: tuple[Nodule, ...] = field(default_factory=tuple)

    @property
    def scanner(self) -> ScannerProfile:
        return SCANNERS[self.scanner_index]

    @property
    def patient_id(self) -> str:
        return self.identifiers.patient_id

    def series_dir(self, dicom_dir: Path) -> Path:
        """Folder of this patient's series: <PatientID>/ST<uid tail>/SE<series number>."""
        study_tail = self.identifiers.study_instance_uid.replace(".", "")[-8:]
        return dicom_dir / self.patient_id / f"ST{study_tail}" / f"SE{self.series_number:04d}"

    def file_name(self, slice_index: int) -> str:
        return f"IM{slice_index + 1:04d}{self.file_extension}"


def synth_uid(seed: int, *parts: object) -> str:
    """A valid UID that depends only on the seed and the given parts."""
    return str(generate_uid(entropy_srcs=["ctcompare-synth", GENERATOR_VERSION, str(seed), *map(str, parts)]))
