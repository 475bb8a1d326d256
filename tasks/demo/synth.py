"""A synthetic chest-CT demo cohort written as real DICOM files, with per-patient "nodule" / "normal" labels.

Layout under OUT_DIR (see data_schemas/synth.py for the side files):
    dicom/<PatientID>/ST<study UID tail>/SE<series number>/IM0001.dcm   one study, one series per patient;
                                                                         some series have no .dcm extension
    labels.csv, lesions.csv (true nodule discs per slice), cohort.json, identifiers.json (PRIVATE)

Everything is a pure function of (parameters, seed): UIDs come from generate_uid with seeded entropy and no
wall-clock value is written, so two runs with the same seed give byte-identical files.

Geometry is in millimetres in the DICOM patient frame (LPS): x to the patient's left (image right), y posterior
(image down), origin at the image centre. Anatomy is drawn at the target matrix size with vectorised numpy.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders import JPEG2000LosslessEncoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    UID,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from data_schemas.synth import (
    COHORT_CARD_FILE,
    DICOM_DIR,
    IDENTIFIERS_FILE,
    LABEL_NODULE,
    LABEL_NORMAL,
    LABELS_FILE,
    CohortCard,
    IdentifiersFile,
    LabelRow,
    NoduleSummary,
    PatientIdentifiers,
    SynthParameters,
    ValueRange,
)
from data_schemas.files import atomic_write_bytes, read_model_json, write_model_json, write_models_csv
from data_schemas.visual import LESIONS_SIDECAR_FILE, LesionSidecarRow

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


# ----------------------------------------------------------------------------------------------- scanners


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


# ----------------------------------------------------------------------------------------------- the plan


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


def validate_synth_parameters(patients: int, slices_per_patient: int, matrix_sizes: Sequence[int]) -> None:
    """Raise ValueError with one sentence when the cohort parameters make no sense."""
    if patients < 2:
        raise ValueError(f"--patients must be at least 2 so that both labels occur, got {patients}.")
    if patients > MAX_PATIENTS:
        raise ValueError(f"--patients must be at most {MAX_PATIENTS}, got {patients}.")
    if slices_per_patient < 1:
        raise ValueError(f"--slices-per-patient must be at least 1, got {slices_per_patient}.")
    if slices_per_patient > MAX_SLICES_PER_PATIENT:
        raise ValueError(f"--slices-per-patient must be at most {MAX_SLICES_PER_PATIENT}, got {slices_per_patient}.")
    if not matrix_sizes or any(not 64 <= size <= 1024 for size in matrix_sizes):
        raise ValueError(f"matrix sizes must be between 64 and 1024 pixels, got {list(matrix_sizes)}.")


def _quota_assignment(rng: np.random.Generator, n: int, shares: Sequence[float], minimum_one: Sequence[bool]) -> np.ndarray:
    """Assign n items to categories with exact rounded counts (shuffled), so small cohorts still get every kind."""
    counts = [int(round(share * n)) for share in shares]
    for k, need in enumerate(minimum_one):
        if need and counts[k] == 0 and n > len(shares) - 1:
            counts[k] = 1
    counts[0] = n - sum(counts[1:])  # category 0 takes the remainder
    if counts[0] < 0:
        raise ValueError("category shares exceed the item count")
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def _uid(seed: int, *parts: object) -> str:
    """A valid UID that depends only on the seed and the given parts."""
    return str(generate_uid(entropy_srcs=["ctcompare-synth", GENERATOR_VERSION, str(seed), *map(str, parts)]))


def _lung_scale(z_frac: float) -> float:
    """Relative lung cross-section size at a cranio-caudal position (0 apex, 1 base): widest mid-chest."""
    return 0.62 + 0.38 * math.sin(math.pi * min(max(z_frac, 0.0), 1.0))


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    ax: float
    ay: float

    def contains(self, x: float, y: float, margin: float = 0.0) -> bool:
        """True when (x, y) is inside the ellipse shrunk by margin mm (negative margin grows it)."""
        ax, ay = self.ax - margin, self.ay - margin
        if ax <= 0 or ay <= 0:
            return False
        return ((x - self.cx) / ax) ** 2 + ((y - self.cy) / ay) ** 2 <= 1.0


@dataclass(frozen=True)
class SliceGeometry:
    """The anatomy of one slice: the parts that change along z."""

    z_mm: float
    z_frac: float
    cavity: Ellipse
    lungs: tuple[Ellipse, Ellipse]  # patient's right (image left), patient's left
    mediastinum: Ellipse
    paraspinal: Ellipse
    aorta: Ellipse
    vertebral_body: Ellipse
    spinal_canal: Ellipse
    airways: tuple[Ellipse, ...]
    sternum: Ellipse
    rib_ring: Ellipse

    def occluders(self) -> tuple[Ellipse, ...]:
        """Structures drawn over the lungs: a nodule must keep clear of them to stay visible."""
        return (self.mediastinum, self.paraspinal, self.aorta, self.vertebral_body, *self.airways)


def slice_geometry(plan: PatientPlan, slice_index: int) -> SliceGeometry:
    """Anatomy of one slice; lungs grow or shrink smoothly with the slice position."""
    offset_mm = slice_index * plan.slice_thickness_mm
    z_frac = plan.z_start_frac + offset_mm / LUNG_CRANIOCAUDAL_MM
    a, b, cy, fat = plan.body_half_width_mm, plan.body_half_depth_mm, plan.body_center_y_mm, plan.fat_mm
    cavity = Ellipse(0.0, cy + 3.0, a - fat - 14.0, b - fat - 14.0)
    big_a, big_b = cavity.ax, cavity.ay
    scale = _lung_scale(z_frac)
    lung_ax, lung_ay = 0.45 * big_a * scale, 0.88 * big_b * (0.85 + 0.15 * scale)
    lung_cy = cavity.cy + 0.06 * big_b
    lungs = (
        Ellipse(-(0.97 * big_a - lung_ax), lung_cy, lung_ax, lung_ay),
        Ellipse(+(0.97 * big_a - lung_ax), lung_cy, lung_ax, lung_ay),
    )
    # The heart appears below mid-chest and pushes into the patient's left lung.
    heart = float(np.clip((z_frac - 0.35) / 0.35, 0.0, 1.0))
    heart = heart * heart * (3.0 - 2.0 * heart)
    mediastinum = Ellipse(0.12 * big_a * heart, cavity.cy - 0.26 * big_b + 0.12 * big_b * heart,
                          big_a * (0.17 + 0.19 * heart), big_b * (0.42 + 0.16 * heart))
    canal_y = cy + b - fat - 38.0
    vertebral_body = Ellipse(0.0, canal_y - 24.0, 16.0, 14.5)
    spinal_canal = Ellipse(0.0, canal_y, 7.5, 7.0)
    paraspinal = Ellipse(0.0, canal_y - 12.0, 42.0, 34.0)
    aorta = Ellipse(22.0, vertebral_body.cy - 22.0, 12.0, 12.0)
    trachea_y = vertebral_body.cy - 34.0
    if z_frac < 0.38:
        airways: tuple[Ellipse, ...] = (Ellipse(0.0, trachea_y, 9.0, 8.0),)
    elif z_frac < 0.5:
        airways = (Ellipse(-13.0, trachea_y + 4.0, 6.0, 5.5), Ellipse(13.0, trachea_y + 6.0, 5.5, 5.0))
    else:
        airways = ()
    sternum = Ellipse(0.0, cy - b + fat + 11.0, 13.0, 5.5)
    rib_ring = Ellipse(cavity.cx, cavity.cy, big_a + 7.0, big_b + 7.0)
    return SliceGeometry(plan.z_start_mm - offset_mm, z_frac, cavity, lungs, mediastinum, paraspinal, aorta,
                         vertebral_body, spinal_canal, airways, sternum, rib_ring)


def _nodule_center(nodule: Nodule, geometry: SliceGeometry, offset_mm: float) -> tuple[float, float]:
    lung = geometry.lungs[0 if nodule.side < 0 else 1]
    u = nodule.u + nodule.du_per_mm * offset_mm
    v = nodule.v + nodule.dv_per_mm * offset_mm
    return lung.cx + u * lung.ax, lung.cy + v * lung.ay


def _nodule_cross_sections(plan: PatientPlan, slice_index: int,
                           geometry: SliceGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres x, y (mm) and minor semi-axes (mm) of every nodule's cross-section in one slice."""
    offset_mm = slice_index * plan.slice_thickness_mm
    centers = [_nodule_center(n, geometry, offset_mm) for n in plan.nodules]
    # Real nodules change a little in cross-section from slice to slice.
    wobble = np.array([1.0 - 0.12 * abs(math.sin(0.35 * slice_index + n.lobe_phase)) for n in plan.nodules])
    radius = np.array([n.diameter_mm / 2 for n in plan.nodules]) * wobble
    return np.array([c[0] for c in centers]), np.array([c[1] for c in centers]), radius


def nodule_discs(plan: PatientPlan, slice_index: int) -> list[tuple[float, float, float]]:
    """(centre row, centre column, radius) in pixels of the stored matrix for every nodule drawn in one slice.

    The radius is that of the circle enclosing the drawn nodule: major semi-axis times (1 + lobulation), the
    soft edge left out. Pixel (0, 0) is the first stored pixel; coordinates are of pixel centres.
    """
    if not plan.nodules:
        return []
    cx, cy, radius = _nodule_cross_sections(plan, slice_index, slice_geometry(plan, slice_index))
    grid = _Grid(plan.matrix, plan.pixel_spacing_mm)
    return [
        (grid.index(float(y)), grid.index(float(x)), float(r) * max(n.aspect, 1.0) * (1 + n.lobulation) / grid.spacing)
        for x, y, r, n in zip(cx, cy, radius, plan.nodules)
    ]


def lesion_rows(plans: Sequence[PatientPlan]) -> list[LesionSidecarRow]:
    """One lesions.csv row per nodule cross-section, keyed by the file's path under dicom/ (see tasks/ingest/lesions.py)."""
    rows: list[LesionSidecarRow] = []
    for plan in plans:
        series = plan.series_dir(Path()).as_posix()
        for j in range(plan.slices):
            for lesion, (row, col, radius) in enumerate(nodule_discs(plan, j)):
                rows.append(LesionSidecarRow(path=f"{series}/{plan.file_name(j)}", frame=0, lesion=lesion,
                                             center_row=round(row, 3), center_col=round(col, 3),
                                             radius_px=round(radius, 3)))
    return rows


def _nodule_visible_everywhere(plan: PatientPlan, nodule: Nodule) -> bool:
    """True when the nodule sits well inside its lung and clear of every occluder in every slice."""
    radius = nodule.diameter_mm / 2 * (1 + nodule.lobulation) * max(nodule.aspect, 1.0)
    for j in range(plan.slices):
        geometry = slice_geometry(plan, j)
        x, y = _nodule_center(nodule, geometry, j * plan.slice_thickness_mm)
        lung = geometry.lungs[0 if nodule.side < 0 else 1]
        if not lung.contains(x, y, margin=radius + 3.0) or not geometry.cavity.contains(x, y, margin=radius + 5.0):
            return False
        if any(occluder.contains(x, y, margin=-(radius + 3.0)) for occluder in geometry.occluders()):
            return False
    return True


def _draw_nodules(rng: np.random.Generator, plan: PatientPlan) -> tuple[Nodule, ...]:
    """One to three nodules, mostly small; rejection-sampled until each is visible in every slice."""
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    nodules: list[Nodule] = []
    attempts = 0
    while len(nodules) < count:
        attempts += 1
        # 8-26 mm (mean ~14 mm): at the cpu profile's 112-128 px a pixel is ~3 mm, so smaller nodules would be
        # invisible to the model; bigger ones are easy, so they are rarer. Vessels (<= 7.4 mm) remain decoys.
        diameter = float(np.clip(8.0 + rng.gamma(2.0, 3.0), 8.0, 26.0 if attempts < 200 else 10.0))
        solid = rng.random() < 0.75
        radius = math.sqrt(rng.random()) * 0.75
        theta = rng.uniform(0, 2 * math.pi)
        candidate = Nodule(
            side=int(rng.choice([-1, 1])),
            u=radius * math.cos(theta),
            v=radius * math.sin(theta),
            du_per_mm=float(rng.normal(0, 0.0015)),
            dv_per_mm=float(rng.normal(0, 0.0015)),
            diameter_mm=diameter,
            core_hu=float(rng.uniform(-50.0, 100.0) if solid else rng.uniform(-300.0, -50.0)),
            edge_mm=float(rng.uniform(0.4, 0.8) if solid else rng.uniform(1.0, 2.0)),
            aspect=float(rng.uniform(1.0, 1.25)),
            angle=float(rng.uniform(0, math.pi)),
            lobulation=float(rng.uniform(0.0, 0.12)),
            lobes=int(rng.integers(3, 7)),
            lobe_phase=float(rng.uniform(0, 2 * math.pi)),
        )
        if _nodule_visible_everywhere(plan, candidate):
            nodules.append(candidate)
        elif attempts > 2000:  # cannot happen with the current geometry; guards against an endless loop
            raise RuntimeError("could not place a visible nodule")
    return tuple(nodules)


def _draw_vessels(rng: np.random.Generator, slices: int, thickness_mm: float) -> VesselTubes:
    """Vessel tubes, thicker near the hilum; they come and go along z like real branching vessels."""
    coverage = slices * thickness_mm
    n = int(rng.integers(70, 110)) * 2
    side = rng.choice([-1, 1], size=n)
    radius_norm = np.sqrt(rng.random(n)) * 0.95
    theta = rng.uniform(0, 2 * np.pi, n)
    u, v = radius_norm * np.cos(theta), radius_norm * np.sin(theta)
    # Hilum: the medial side of each lung (u toward the midline).
    hilum_distance = np.hypot(u + side * 0.7, v + 0.1) / 1.7
    radius_mm = (0.7 + 3.0 * np.clip(1.0 - hilum_distance, 0, 1) ** 2) * rng.uniform(0.6, 1.15, n)
    peak_hu = np.clip(-420.0 + 240.0 * radius_mm, -300.0, 45.0) + rng.normal(0, 25, n)
    return VesselTubes(
        side=side,
        u=u,
        v=v,
        du_per_mm=rng.normal(0, 0.004, n),
        dv_per_mm=rng.normal(0, 0.004, n),
        z_center_mm=rng.uniform(-30.0, coverage + 30.0, n),
        z_half_length_mm=rng.uniform(8.0, 45.0, n),
        radius_mm=radius_mm,
        aspect=rng.uniform(1.0, 2.6, n),
        peak_hu=peak_hu,
    )


def plan_cohort(patients: int, slices_per_patient: int, seed: int,
                matrix_sizes: Sequence[int] = DEFAULT_MATRIX_SIZES) -> list[PatientPlan]:
    """Draw every patient's identifiers, scanner, geometry and nodules from the seed."""
    validate_synth_parameters(patients, slices_per_patient, matrix_sizes)
    rng = np.random.default_rng([seed, 7_301])
    n_positive = int(round(POSITIVE_SHARE * patients))
    labels = rng.permutation([LABEL_NODULE] * n_positive + [LABEL_NORMAL] * (patients - n_positive))
    # Scanner, matrix and file format are drawn independently of the label: no shortcut for the classifier.
    scanner_of = rng.integers(0, len(SCANNERS), patients)
    matrix_shares = [1.0] if len(matrix_sizes) == 1 else [0.7] + [0.3 / (len(matrix_sizes) - 1)] * (len(matrix_sizes) - 1)
    matrix_of = _quota_assignment(rng, patients, matrix_shares, [False] + [True] * (len(matrix_sizes) - 1))
    syntaxes: list[str] = [ExplicitVRLittleEndian, RLELossless]
    syntax_shares = [1.0 - RLE_SHARE, RLE_SHARE]
    if JPEG2000LosslessEncoder.is_available:
        syntaxes.append(JPEG2000Lossless)
        syntax_shares = [1.0 - RLE_SHARE - JPEG2000_SHARE, RLE_SHARE, JPEG2000_SHARE]
    syntax_of = _quota_assignment(rng, patients, syntax_shares, [False, True, False])
    bare_names = _quota_assignment(rng, patients, [1 - NO_EXTENSION_SHARE, NO_EXTENSION_SHARE], [False, True])
    mrns = rng.choice(9_000_000, size=patients, replace=False) + 1_000_000
    accessions = rng.choice(90_000_000, size=patients, replace=False) + 10_000_000
    study_ids = rng.choice(900_000, size=patients, replace=False) + 100_000

    plans: list[PatientPlan] = []
    for i in range(patients):
        prng = np.random.default_rng([seed, 7_302, i])
        scanner = SCANNERS[int(scanner_of[i])]
        sex = "F" if prng.random() < 0.5 else "M"
        first = prng.choice(FEMALE_FIRST_NAMES if sex == "F" else MALE_FIRST_NAMES)
        age = int(prng.integers(35, 86))
        study_day = np.datetime64("2019-01-01") + int(prng.integers(0, 6 * 365))
        birth_day = study_day - np.timedelta64(age * 365 + int(prng.integers(0, 365)), "D")
        study_time = f"{int(prng.integers(7, 19)):02d}{int(prng.integers(0, 60)):02d}{int(prng.integers(0, 60)):02d}"
        patient_id = f"MRN{int(mrns[i]):07d}"
        study_uid = _uid(seed, patient_id, "study")
        series_number = int(prng.integers(2, 6))
        identifiers = PatientIdentifiers(
            patient_id=patient_id,
            patient_name=f"{prng.choice(LAST_NAMES)}^{first}",
            patient_birth_date=str(birth_day).replace("-", ""),
            accession_number=f"ACC{int(accessions[i]):08d}",
            study_id=f"CT{int(study_ids[i]):06d}",
            institution_name=scanner.institution_name,
            referring_physician_name=str(prng.choice(REFERRING_PHYSICIANS)),
            station_name=scanner.station_name,
            study_instance_uid=study_uid,
            series_instance_uid=_uid(seed, patient_id, "series", series_number),
        )
        matrix = int(matrix_sizes[int(matrix_of[i])])
        half_width = float(prng.uniform(135.0, 175.0))
        # Reconstruction field of view covers the body plus a margin; spacing scales with the matrix so a
        # 256 matrix shows the same anatomy at coarser pixels, as a real low-resolution reconstruction does.
        spacing_512 = float(prng.uniform(max(0.6, (2 * half_width + 40.0) / 512), 0.9))
        spacing = round(spacing_512 * 512 / matrix, 4)
        thickness = float(prng.choice(SLICE_THICKNESSES_MM))
        max_start = max(0.2, 0.8 - slices_per_patient * thickness / LUNG_CRANIOCAUDAL_MM)
        z_start_frac = float(prng.uniform(0.2, max_start))
        n_ribs = int(prng.integers(14, 19))
        rib_angles = np.concatenate([
            prng.uniform(np.deg2rad(105), np.deg2rad(255), n_ribs // 2),
            prng.uniform(np.deg2rad(-75), np.deg2rad(75), n_ribs - n_ribs // 2),
        ])
        plan = PatientPlan(
            index=i,
            seed=seed,
            label=str(labels[i]),
            identifiers=identifiers,
            patient_sex=sex,
            patient_age=f"{age:03d}Y",
            study_date=str(study_day).replace("-", ""),
            study_time=study_time,
            frame_of_reference_uid=_uid(seed, patient_id, "frame"),
            series_number=series_number,
            scanner_index=int(scanner_of[i]),
            matrix=matrix,
            pixel_spacing_mm=spacing,
            slice_thickness_mm=thickness,
            slices=slices_per_patient,
            transfer_syntax=str(syntaxes[int(syntax_of[i])]),
            file_extension="" if bare_names[i] == 1 else ".dcm",
            body_half_width_mm=half_width,
            body_half_depth_mm=half_width * float(prng.uniform(0.62, 0.72)),
            body_center_y_mm=float(prng.uniform(-16.0, -6.0)),
            fat_mm=float(prng.uniform(7.0, 24.0)),
            z_start_mm=float(round(prng.uniform(-220.0, -120.0), 2)),
            z_start_frac=z_start_frac,
            lung_hu=float(prng.uniform(-875.0, -825.0)),
            lung_texture_hu=float(prng.uniform(18.0, 32.0)),
            texture_offset=(int(prng.integers(0, matrix)), int(prng.integers(0, matrix))),
            rib_angles=rib_angles,
            rib_drift_per_mm=prng.normal(0, np.deg2rad(0.35), n_ribs),
            rib_size_mm=np.stack([prng.uniform(5.0, 8.5, n_ribs), prng.uniform(3.2, 4.5, n_ribs)], axis=1),
            vessels=_draw_vessels(prng, slices_per_patient, thickness),
        )
        if plan.label == LABEL_NODULE:
            plan = _with_nodules(plan, _draw_nodules(prng, plan))
        plans.append(plan)
    return plans


def _with_nodules(plan: PatientPlan, nodules: tuple[Nodule, ...]) -> PatientPlan:
    return replace(plan, nodules=nodules)


# ----------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=16)
def _correlated_field(seed: int, size: int, sigma_px: float, salt: int) -> np.ndarray:
    """A (2*size, 2*size) Gaussian random field with unit std; slices crop it at random offsets (cheap noise)."""
    rng = np.random.default_rng([seed, 7_303, size, salt])
    white = rng.standard_normal((2 * size, 2 * size), dtype=np.float32)
    smooth = gaussian_filter(white, sigma_px, mode="wrap")
    smooth /= smooth.std()
    return smooth


def _crop_field(field_2n: np.ndarray, size: int, offset: tuple[int, int], flip: int) -> np.ndarray:
    oy, ox = offset[0] % size, offset[1] % size
    crop = field_2n[oy:oy + size, ox:ox + size]
    if flip & 1:
        crop = crop[::-1]
    if flip & 2:
        crop = crop[:, ::-1]
    if flip & 4:
        crop = crop.T
    return crop


@dataclass(frozen=True)
class _Grid:
    """Pixel-centre coordinates in mm of a square matrix centred on the origin."""

    size: int
    spacing: float

    @functools.cached_property
    def coords(self) -> np.ndarray:
        return ((np.arange(self.size, dtype=np.float32) - (self.size - 1) / 2) * self.spacing).astype(np.float32)

    def index(self, mm: float) -> float:
        return mm / self.spacing + (self.size - 1) / 2

    def window(self, e: Ellipse) -> tuple[slice, slice, np.ndarray]:
        """Bounding box of an ellipse and the inside mask within it (drawing only touches the box: fast)."""
        r0 = max(0, int(math.floor(self.index(e.cy - e.ay))))
        r1 = min(self.size, int(math.ceil(self.index(e.cy + e.ay))) + 1)
        c0 = max(0, int(math.floor(self.index(e.cx - e.ax))))
        c1 = min(self.size, int(math.ceil(self.index(e.cx + e.ax))) + 1)
        x = (self.coords[c0:c1] - e.cx) / e.ax
        y = (self.coords[r0:r1] - e.cy) / e.ay
        inside = (y * y)[:, None] + (x * x)[None, :] <= 1.0
        return slice(r0, r1), slice(c0, c1), inside


def _paint(image: np.ndarray, grid: _Grid, e: Ellipse, value: float) -> None:
    rows, cols, inside = grid.window(e)
    image[rows, cols][inside] = value


def _blobs(image: np.ndarray, grid: _Grid, cx: np.ndarray, cy: np.ndarray, semi_a: np.ndarray, semi_b: np.ndarray,
           angle: np.ndarray, value: np.ndarray, edge_mm: np.ndarray, where: np.ndarray | None = None,
           lobulation: np.ndarray | None = None, lobes: np.ndarray | None = None,
           lobe_phase: np.ndarray | None = None) -> None:
    """Blend soft-edged rotated ellipses into the image (optionally only where `where` is True)."""
    if len(cx) == 0:
        return
    sp = grid.spacing
    lob = np.zeros_like(cx) if lobulation is None else lobulation
    reach_px = (np.maximum(semi_a, semi_b) * (1 + lob) + 2 * edge_mm) / sp
    patch = 2 * int(math.ceil(float(reach_px.max()))) + 3
    ci, ri = grid.index(cx), grid.index(cy)
    c0 = np.round(ci).astype(int) - patch // 2
    r0 = np.round(ri).astype(int) - patch // 2
    steps = np.arange(patch, dtype=np.float32)
    dx = ((c0[:, None] + steps[None, :]) - ci[:, None]) * sp  # (K, P) mm
    dy = ((r0[:, None] + steps[None, :]) - ri[:, None]) * sp
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    along = dx[:, None, :] * cos + dy[:, :, None] * sin
    across = -dx[:, None, :] * sin + dy[:, :, None] * cos
    q = np.sqrt((along / semi_a[:, None, None]) ** 2 + (across / semi_b[:, None, None]) ** 2)
    if lobulation is not None:
        phi = np.arctan2(across, along)
        q = q / (1 + lob[:, None, None] * np.cos(lobes[:, None, None] * phi + lobe_phase[:, None, None]))
    # Distance outside the boundary in mm (approximately), turned into a soft occupancy in [0, 1].
    radius_small = np.minimum(semi_a, semi_b)[:, None, None]
    occupancy = np.clip(0.5 + (1.0 - q) * radius_small / edge_mm[:, None, None], 0.0, 1.0).astype(np.float32)
    size = grid.size
    for k in range(len(cx)):
        ra, ca = r0[k], c0[k]
        rs, cs = max(ra, 0), max(ca, 0)
        re, ce = min(ra + patch, size), min(ca + patch, size)
        if rs >= re or cs >= ce:
            continue
        occ = occupancy[k, rs - ra:re - ra, cs - ca:ce - ca]
        if where is not None:
            occ = occ * where[rs:re, cs:ce]
        region = image[rs:re, cs:ce]
        region += occ * (value[k] - region)


def _ring_blobs(image: np.ndarray, grid: _Grid, cx: np.ndarray, cy: np.ndarray, semi_a: np.ndarray,
                semi_b: np.ndarray, angle: np.ndarray, cortex_hu: np.ndarray, marrow_hu: float, cortex_mm: float) -> None:
    """Bones in cross-section: a bright cortical shell around a dimmer marrow core."""
    edge = np.full_like(cx, 0.4)
    _blobs(image, grid, cx, cy, semi_a, semi_b, angle, cortex_hu, edge)
    _blobs(image, grid, cx, cy, np.maximum(semi_a - cortex_mm, 0.5), np.maximum(semi_b - cortex_mm, 0.5), angle,
           np.full_like(cx, marrow_hu), edge)


@dataclass(frozen=True)
class _StaticBody:
    """The parts of a patient's slices that do not change along z."""

    image: np.ndarray  # air, fat, chest-wall muscle, thoracic cavity, table (HU)
    body_mask: np.ndarray
    cavity_mask: np.ndarray  # where lung may be: inside the ribs


def _static_body(plan: PatientPlan, grid: _Grid) -> _StaticBody:
    """Air, body fat, chest-wall muscle, thoracic cavity and table: the same in every slice."""
    a, b, cy, fat = plan.body_half_width_mm, plan.body_half_depth_mm, plan.body_center_y_mm, plan.fat_mm
    image = np.full((grid.size, grid.size), -1000.0, dtype=np.float32)
    body = Ellipse(0.0, cy, a, b)
    _paint(image, grid, body, -105.0)
    _paint(image, grid, Ellipse(0.0, cy + 2.0, a - fat, b - fat * 0.8), 45.0)
    body_mask = np.zeros_like(image, dtype=bool)
    rows, cols, inside = grid.window(body)
    body_mask[rows, cols] = inside
    cavity = slice_geometry(plan, 0).cavity
    _paint(image, grid, cavity, 30.0)
    cavity_mask = np.zeros_like(image, dtype=bool)
    rows, cols, inside = grid.window(Ellipse(cavity.cx, cavity.cy, cavity.ax - 1.5, cavity.ay - 1.5))
    cavity_mask[rows, cols] = inside
    # Table: carbon-fibre shells around a foam core, under the patient.
    top = cy + b + 6.0
    half = 0.85 * grid.size * grid.spacing / 2
    c0, c1 = int(grid.index(-half)), int(grid.index(half))
    for y0, y1, hu in ((top, top + 2.0, 180.0), (top + 2.0, top + 10.0, -820.0), (top + 10.0, top + 12.0, 180.0)):
        r0, r1 = int(round(grid.index(y0))), max(int(round(grid.index(y1))), int(round(grid.index(y0))) + 1)
        image[max(r0, 0):min(r1, grid.size), c0:c1] = hu
    return _StaticBody(image, body_mask, cavity_mask)


def _render_slice(plan: PatientPlan, slice_index: int, grid: _Grid, static: _StaticBody,
                  include_nodules: bool = True) -> np.ndarray:
    geometry = slice_geometry(plan, slice_index)
    offset_mm = slice_index * plan.slice_thickness_mm
    image = static.image.copy()
    body_mask = static.body_mask
    srng = np.random.default_rng([plan.seed, 7_304, plan.index, slice_index])

    # Lungs: two ellipses cut by the chest wall, so their lateral edge follows the ribs.
    lung_mask = np.zeros(image.shape, dtype=bool)
    for lung in geometry.lungs:
        rows, cols, inside = grid.window(lung)
        lung_mask[rows, cols] |= inside
    lung_mask &= static.cavity_mask
    # Lung parenchyma: base density, a smooth texture that drifts a little from slice to slice, and denser
    # dependent (posterior) lung, as in a supine patient.
    # One cached field per matrix size (about 2.5 mm correlation at typical spacing), cropped per patient.
    texture = _crop_field(_correlated_field(plan.seed, grid.size, 3.3 * grid.size / 512, 1), grid.size,
                          (plan.texture_offset[0] + int(offset_mm * 0.8 / grid.spacing), plan.texture_offset[1]), 0)
    lung_top = geometry.lungs[0].cy - geometry.lungs[0].ay
    dependent = np.clip((grid.coords - lung_top) / (2 * geometry.lungs[0].ay), 0, 1) ** 2 * 70.0
    lung_values = plan.lung_hu + plan.lung_texture_hu * texture + dependent[:, None]
    image[lung_mask] = lung_values[lung_mask]

    # Vessels: the tubes that cross this slice, as small bright blobs (elongated when running in-plane).
    vt = plan.vessels
    z_rel = offset_mm
    present = np.abs(z_rel - vt.z_center_mm) < vt.z_half_length_mm
    if present.any():
        side = vt.side[present]
        lung_cx = np.where(side < 0, geometry.lungs[0].cx, geometry.lungs[1].cx)
        lung_ax, lung_ay, lung_cy = geometry.lungs[0].ax, geometry.lungs[0].ay, geometry.lungs[0].cy
        u = vt.u[present] + vt.du_per_mm[present] * z_rel
        v = vt.v[present] + vt.dv_per_mm[present] * z_rel
        cx, cy = lung_cx + u * lung_ax, lung_cy + v * lung_ay
        # In-plane vessels point away from the hilum.
        angle = np.arctan2(v + 0.1, u + side * 0.7)
        radius = vt.radius_mm[present]
        _blobs(image, grid, cx, cy, radius * vt.aspect[present], radius, angle, vt.peak_hu[present],
               np.full_like(cx, 0.5), where=lung_mask)

    if include_nodules and plan.nodules:
        cx, cy, radius = _nodule_cross_sections(plan, slice_index, geometry)
        aspect = np.array([n.aspect for n in plan.nodules])
        _blobs(image, grid, cx, cy, radius * aspect,
               radius, np.array([n.angle for n in plan.nodules]), np.array([n.core_hu for n in plan.nodules]),
               np.array([n.edge_mm for n in plan.nodules]), where=lung_mask,
               lobulation=np.array([n.lobulation for n in plan.nodules]),
               lobes=np.array([n.lobes for n in plan.nodules], dtype=np.float64),
               lobe_phase=np.array([n.lobe_phase for n in plan.nodules]))

    # Structures over the lungs: mediastinum and heart, posterior muscles, aorta, airways, spine, sternum, ribs.
    _paint(image, grid, geometry.mediastinum, 38.0)
    _paint(image, grid, geometry.paraspinal, 48.0)
    _paint(image, grid, geometry.aorta, 42.0)
    for airway in geometry.airways:
        _paint(image, grid, Ellipse(airway.cx, airway.cy, airway.ax + 1.8, airway.ay + 1.8), 60.0)
        _paint(image, grid, airway, -990.0)
    vb, canal = geometry.vertebral_body, geometry.spinal_canal
    spine_cx = np.array([vb.cx, -19.0, 19.0, 0.0])
    spine_cy = np.array([vb.cy, canal.cy + 3.0, canal.cy + 3.0, canal.cy + 17.0])
    _ring_blobs(image, grid, spine_cx, spine_cy, np.array([vb.ax, 11.0, 11.0, 4.5]), np.array([vb.ay, 5.0, 5.0, 11.0]),
                np.array([0.0, -0.35, 0.35, 0.0]), np.array([880.0, 760.0, 760.0, 720.0]), 230.0, 2.2)
    _paint(image, grid, canal, 25.0)
    st = geometry.sternum
    _ring_blobs(image, grid, np.array([st.cx]), np.array([st.cy]), np.array([st.ax]), np.array([st.ay]),
                np.array([0.0]), np.array([520.0]), 180.0, 1.6)
    angles = plan.rib_angles + plan.rib_drift_per_mm * offset_mm
    ring = geometry.rib_ring
    rib_x, rib_y = ring.cx + ring.ax * np.cos(angles), ring.cy + ring.ay * np.sin(angles)
    tangent = np.arctan2(ring.ay * np.cos(angles), -ring.ax * np.sin(angles))
    _ring_blobs(image, grid, rib_x, rib_y, plan.rib_size_mm[:, 0], plan.rib_size_mm[:, 1], tangent,
                np.full(len(angles), 900.0) + srng.normal(0, 40, len(angles)), 260.0, 1.3)

    # Partial volume: a light separable [1 2 1]/4 blur softens the hard painted edges.
    blurred = image * 0.5
    blurred[1:] += image[:-1] * 0.25
    blurred[:-1] += image[1:] * 0.25
    blurred[0] += image[0] * 0.25
    blurred[-1] += image[-1] * 0.25
    image = blurred * 0.5
    image[:, 1:] += blurred[:, :-1] * 0.25
    image[:, :-1] += blurred[:, 1:] * 0.25
    image[:, 0] += blurred[:, 0] * 0.25
    image[:, -1] += blurred[:, -1] * 0.25

    # Scanner noise: slightly correlated, stronger through the body than in the air around it.
    scanner = plan.scanner
    noise_sigma_px = scanner.noise_correlation_px * (grid.size / 512) ** 0.5
    noise = _crop_field(_correlated_field(plan.seed, grid.size, noise_sigma_px, 100 + plan.scanner_index),
                        grid.size, (int(srng.integers(0, grid.size)), int(srng.integers(0, grid.size))),
                        int(srng.integers(0, 8)))
    image += noise * np.where(body_mask, scanner.noise_sigma_hu, 0.7 * scanner.noise_sigma_hu).astype(np.float32)
    return image


def render_patient_hu(plan: PatientPlan, include_nodules: bool = True) -> Iterator[np.ndarray]:
    """Yield each slice of a patient in Hounsfield units (float32, before storage clipping)."""
    grid = _Grid(plan.matrix, plan.pixel_spacing_mm)
    static = _static_body(plan, grid)
    for j in range(plan.slices):
        yield _render_slice(plan, j, grid, static, include_nodules=include_nodules)


def hu_to_stored(hu: np.ndarray, scanner: ScannerProfile) -> np.ndarray:
    """Hounsfield units to stored pixel values (slope 1), clipped to what the scanner's format can hold."""
    lowest = scanner.rescale_intercept
    highest = scanner.rescale_intercept + (2 ** (scanner.bits_stored - (1 if scanner.pixel_representation else 0)) - 1)
    stored = np.rint(np.clip(hu, lowest, highest) - scanner.rescale_intercept)
    size = hu.shape[0]
    if scanner.outside_fov_hu is not None:
        # Outside the reconstruction circle some scanners store a padding value far below air.
        yy, xx = np.ogrid[:size, :size]
        centre = (size - 1) / 2
        outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (size / 2) ** 2
        stored[outside] = scanner.outside_fov_hu - scanner.rescale_intercept
    return stored.astype(np.int16 if scanner.pixel_representation else np.uint16)


# ----------------------------------------------------------------------------------------------- DICOM writing


def _dicom_slice(plan: PatientPlan, slice_index: int, stored: np.ndarray) -> Dataset:
    """A CT Image Storage dataset for one slice (compressed when the plan says so)."""
    scanner = plan.scanner
    ids = plan.identifiers
    sop_uid = _uid(plan.seed, ids.patient_id, "instance", slice_index)
    geometry_z = plan.z_start_mm - slice_index * plan.slice_thickness_mm
    size, spacing = plan.matrix, plan.pixel_spacing_mm
    first_pixel = -(size - 1) / 2 * spacing

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
    ds.StudyTime = plan.study_time
    ds.SeriesTime = ds.AcquisitionTime = plan.study_time
    ds.ContentTime = f"{plan.study_time}.{slice_index:06d}"
    ds.AccessionNumber = ids.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = ids.institution_name
    ds.ReferringPhysicianName = ids.referring_physician_name
    ds.StationName = ids.station_name
    ds.StudyDescription = "CT CHEST WITHOUT CONTRAST"
    ds.SeriesDescription = f"AXIAL {plan.slice_thickness_mm:g}mm {scanner.convolution_kernel}"
    ds.ManufacturerModelName = scanner.model_name
    ds.PatientName = ids.patient_name
    ds.PatientID = ids.patient_id
    ds.PatientBirthDate = ids.patient_birth_date
    ds.PatientSex = plan.patient_sex
    ds.PatientAge = plan.patient_age
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{plan.slice_thickness_mm:g}"
    ds.KVP = f"{scanner.kvp:g}"
    ds.SpacingBetweenSlices = f"{plan.slice_thickness_mm:g}"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{size * spacing:.1f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.XRayTubeCurrent = 180 + 20 * plan.scanner_index
    ds.ConvolutionKernel = scanner.convolution_kernel
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ids.study_instance_uid
    ds.SeriesInstanceUID = ids.series_instance_uid
    ds.StudyID = ids.study_id
    ds.SeriesNumber = plan.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = slice_index + 1
    ds.ImagePositionPatient = [f"{first_pixel:.4f}", f"{first_pixel:.4f}", f"{geometry_z:.2f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{geometry_z:.2f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{spacing:.4f}", f"{spacing:.4f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = scanner.bits_stored
    ds.HighBit = scanner.bits_stored - 1
    ds.PixelRepresentation = scanner.pixel_representation
    if scanner.outside_fov_hu is not None:
        ds.PixelPaddingValue = int(scanner.outside_fov_hu - scanner.rescale_intercept)
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.RescaleIntercept = f"{scanner.rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.BurnedInAnnotation = "NO"
    ds.PixelData = stored.tobytes()
    if plan.transfer_syntax != ExplicitVRLittleEndian:
        # compress() would otherwise draw a fresh random SOP Instance UID and break determinism.
        ds.compress(UID(plan.transfer_syntax), stored, generate_instance_uid=False)
    return ds


def write_patient_series(plan: PatientPlan, dicom_dir: Path) -> list[Path]:
    """Render and write one patient's series; returns the written paths."""
    series_dir = plan.series_dir(dicom_dir)
    series_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for j, hu in enumerate(render_patient_hu(plan)):
        ds = _dicom_slice(plan, j, hu_to_stored(hu, plan.scanner))
        path = series_dir / plan.file_name(j)
        _write_dataset_atomically(ds, path)
        paths.append(path)
    return paths


def _write_dataset_atomically(ds: Dataset, path: Path) -> None:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------- cohort


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
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} exists and is not a folder.")
    state = existing_cohort_state(out_dir, parameters)
    if state == "different":
        raise CohortMismatchError(
            f"{out_dir} already holds a synthetic cohort made with other parameters; remove it or choose another folder."
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
