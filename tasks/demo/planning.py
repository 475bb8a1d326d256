"""Drawing the cohort's plan from the seed: labels, scanners, formats, identifiers, bodies, vessels and nodules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom.pixels.encoders import JPEG2000LosslessEncoder
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from data_schemas.synth import LABEL_NODULE, LABEL_NORMAL, PatientIdentifiers
from tasks.demo.geometry import nodule_center, slice_geometry
from tasks.demo.patients import (
    DEFAULT_MATRIX_SIZES,
    FEMALE_FIRST_NAMES,
    JPEG2000_SHARE,
    LAST_NAMES,
    LUNG_CRANIOCAUDAL_MM,
    MALE_FIRST_NAMES,
    MAX_PATIENTS,
    MAX_SLICES_PER_PATIENT,
    NO_EXTENSION_SHARE,
    POSITIVE_SHARE,
    REFERRING_PHYSICIANS,
    RLE_SHARE,
    SCANNERS,
    SLICE_THICKNESSES_MM,
    Nodule,
    PatientPlan,
    VesselTubes,
    synth_uid,
)


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


def _quota_assignment(rng: np.random.Generator, n: int, shares: Sequence[float],
                      minimum_one: Sequence[bool]) -> np.ndarray:
    """Assign n items to categories with exact rounded counts (shuffled), so small cohorts still get every kind."""
    counts = [int(round(share * n)) for share in shares]
    for k, need in enumerate(minimum_one):
        if need and counts[k] == 0 and n > len(shares) - 1:
            counts[k] = 1
    counts[0] = n - sum(counts[1:])  # category 0 takes the remainder
    if counts[0] < 0:
        raise ValueError("category shares exceed the item count")
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))




def _nodule_visible_everywhere(plan: PatientPlan, nodule: Nodule) -> bool:
    """True when the nodule sits well inside its lung and clear of every occluder in every slice."""
    radius = nodule.diameter_mm / 2 * (1 + nodule.lobulation) * max(nodule.aspect, 1.0)
    for j in range(plan.slices):
        geometry = slice_geometry(plan, j)
        x, y = nodule_center(nodule, geometry, j * plan.slice_thickness_mm)
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


@dataclass(frozen=True)
class _CohortDraws:
    """What is drawn once for the whole cohort, per patient index: label, scanner, matrix, format, identifiers."""

    labels: np.ndarray
    scanner_of: np.ndarray
    matrix_of: np.ndarray
    syntaxes: list[str]
    syntax_of: np.ndarray
    bare_names: np.ndarray
    mrns: np.ndarray
    accessions: np.ndarray
    study_ids: np.ndarray


def _draw_cohort(seed: int, patients: int, matrix_sizes: Sequence[int]) -> _CohortDraws:
    """Labels, then scanner, matrix and file format (drawn independently of the label: no shortcut for the
    classifier), then record numbers, from the cohort's own random stream."""
    rng = np.random.default_rng([seed, 7_301])
    n_positive = int(round(POSITIVE_SHARE * patients))
    labels = rng.permutation([LABEL_NODULE] * n_positive + [LABEL_NORMAL] * (patients - n_positive))
    scanner_of = rng.integers(0, len(SCANNERS), patients)
    others = len(matrix_sizes) - 1
    matrix_shares = [1.0] if not others else [0.7] + [0.3 / others] * others
    matrix_of = _quota_assignment(rng, patients, matrix_shares, [False] + [True] * others)
    syntaxes: list[str] = [ExplicitVRLittleEndian, RLELossless]
    syntax_shares = [1.0 - RLE_SHARE, RLE_SHARE]
    if JPEG2000LosslessEncoder.is_available:
        syntaxes.append(JPEG2000Lossless)
        syntax_shares = [1.0 - RLE_SHARE - JPEG2000_SHARE, RLE_SHARE, JPEG2000_SHARE]
    syntax_of = _quota_assignment(rng, patients, syntax_shares, [False, True, False])
    bare_names = _quota_assignment(rng, patients, [1 - NO_EXTENSION_SHARE, NO_EXTENSION_SHARE], [False, True])
    return _CohortDraws(
        labels=labels, scanner_of=scanner_of, matrix_of=matrix_of, syntaxes=syntaxes, syntax_of=syntax_of,
        bare_names=bare_names, mrns=rng.choice(9_000_000, size=patients, replace=False) + 1_000_000,
        accessions=rng.choice(90_000_000, size=patients, replace=False) + 10_000_000,
        study_ids=rng.choice(900_000, size=patients, replace=False) + 100_000,
    )


@dataclass(frozen=True)
class _Person:
    """A patient's demographics and study, drawn first from the patient's own stream."""

    sex: str
    age: int
    study_day: np.datetime64
    study_time: str
    series_number: int
    identifiers: PatientIdentifiers


def _draw_person(prng: np.random.Generator, seed: int, i: int, draws: _CohortDraws) -> _Person:
    """Sex, name, age, study date and time, series number and the identifiers of patient i."""
    scanner = SCANNERS[int(draws.scanner_of[i])]
    sex = "F" if prng.random() < 0.5 else "M"
    first = prng.choice(FEMALE_FIRST_NAMES if sex == "F" else MALE_FIRST_NAMES)
    age = int(prng.integers(35, 86))
    study_day = np.datetime64("2019-01-01") + int(prng.integers(0, 6 * 365))
    birth_day = study_day - np.timedelta64(age * 365 + int(prng.integers(0, 365)), "D")
    study_time = f"{int(prng.integers(7, 19)):02d}{int(prng.integers(0, 60)):02d}{int(prng.integers(0, 60)):02d}"
    patient_id = f"MRN{int(draws.mrns[i]):07d}"
    series_number = int(prng.integers(2, 6))
    identifiers = PatientIdentifiers(
        patient_id=patient_id,
        patient_name=f"{prng.choice(LAST_NAMES)}^{first}",
        patient_birth_date=str(birth_day).replace("-", ""),
        accession_number=f"ACC{int(draws.accessions[i]):08d}",
        study_id=f"CT{int(draws.study_ids[i]):06d}",
        institution_name=scanner.institution_name,
        referring_physician_name=str(prng.choice(REFERRING_PHYSICIANS)),
        station_name=scanner.station_name,
        study_instance_uid=synth_uid(seed, patient_id, "study"),
        series_instance_uid=synth_uid(seed, patient_id, "series", series_number),
    )
    return _Person(sex, age, study_day, study_time, series_number, identifiers)


def _plan_patient(seed: int, i: int, draws: _CohortDraws, slices_per_patient: int,
                  matrix_sizes: Sequence[int]) -> PatientPlan:
    """Patient i's plan from its own random stream: the person first, then the body, then its nodules."""
    prng = np.random.default_rng([seed, 7_302, i])
    person = _draw_person(prng, seed, i, draws)
    matrix = int(matrix_sizes[int(draws.matrix_of[i])])
    half_width = float(prng.uniform(135.0, 175.0))
    # Reconstruction field of view covers the body plus a margin; spacing scales with the matrix so a
    # 256 matrix shows the same anatomy at coarser pixels, as a real low-resolution reconstruction does.
    spacing_512 = float(prng.uniform(max(0.6, (2 * half_width + 40.0) / 512), 0.9))
    thickness = float(prng.choice(SLICE_THICKNESSES_MM))
    max_start = max(0.2, 0.8 - slices_per_patient * thickness / LUNG_CRANIOCAUDAL_MM)
    z_start_frac = float(prng.uniform(0.2, max_start))
    n_ribs = int(prng.integers(14, 19))
    rib_angles = np.concatenate([
        prng.uniform(np.deg2rad(105), np.deg2rad(255), n_ribs // 2),
        prng.uniform(np.deg2rad(-75), np.deg2rad(75), n_ribs - n_ribs // 2),
    ])
    plan = PatientPlan(
        index=i, seed=seed, label=str(draws.labels[i]), identifiers=person.identifiers, patient_sex=person.sex,
        patient_age=f"{person.age:03d}Y", study_date=str(person.study_day).replace("-", ""),
        study_time=person.study_time, frame_of_reference_uid=synth_uid(seed, person.identifiers.patient_id, "frame"),
        series_number=person.series_number, scanner_index=int(draws.scanner_of[i]), matrix=matrix,
        pixel_spacing_mm=round(spacing_512 * 512 / matrix, 4), slice_thickness_mm=thickness,
        slices=slices_per_patient, transfer_syntax=str(draws.syntaxes[int(draws.syntax_of[i])]),
        file_extension="" if draws.bare_names[i] == 1 else ".dcm",
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
    return plan


def plan_cohort(patients: int, slices_per_patient: int, seed: int,
                matrix_sizes: Sequence[int] = DEFAULT_MATRIX_SIZES) -> list[PatientPlan]:
    """Draw every patient's identifiers, scanner, geometry and nodules from the seed."""
    validate_synth_parameters(patients, slices_per_patient, matrix_sizes)
    draws = _draw_cohort(seed, patients, matrix_sizes)
    return [_plan_patient(seed, i, draws, slices_per_patient, matrix_sizes) for i in range(patients)]


def _with_nodules(plan: PatientPlan, nodules: tuple[Nodule, ...]) -> PatientPlan:
    return replace(plan, nodules=nodules)
