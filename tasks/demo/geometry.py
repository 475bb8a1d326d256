"""Where things are in a slice: the anatomy along z, the pixel grid, and each nodule's cross-section.

Geometry is in millimetres in the DICOM patient frame (LPS): x to the patient's left (image right), y posterior
(image down), origin at the image centre.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_schemas.visual import LesionSidecarRow
from tasks.demo.patients import LUNG_CRANIOCAUDAL_MM, Nodule, PatientPlan


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


def nodule_center(nodule: Nodule, geometry: SliceGeometry, offset_mm: float) -> tuple[float, float]:
    lung = geometry.lungs[0 if nodule.side < 0 else 1]
    u = nodule.u + nodule.du_per_mm * offset_mm
    v = nodule.v + nodule.dv_per_mm * offset_mm
    return lung.cx + u * lung.ax, lung.cy + v * lung.ay


def nodule_cross_sections(plan: PatientPlan, slice_index: int,
                           geometry: SliceGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres x, y (mm) and minor semi-axes (mm) of every nodule's cross-section in one slice."""
    offset_mm = slice_index * plan.slice_thickness_mm
    centers = [nodule_center(n, geometry, offset_mm) for n in plan.nodules]
    # Real nodules change a little in cross-section from slice to slice.
    wobble = np.array([1.0 - 0.12 * abs(math.sin(0.35 * slice_index + n.lobe_phase)) for n in plan.nodules])
    radius = np.array([n.diameter_mm / 2 for n in plan.nodules]) * wobble
    return np.array([c[0] for c in centers]), np.array([c[1] for c in centers]), radius


@dataclass(frozen=True)
class PixelGrid:
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


def nodule_discs(plan: PatientPlan, slice_index: int) -> list[tuple[float, float, float]]:
    """(centre row, centre column, radius) in pixels of the stored matrix for every nodule drawn in one slice.

    The radius is that of the circle enclosing the drawn nodule: major semi-axis times (1 + lobulation), the
    soft edge left out. Pixel (0, 0) is the first stored pixel; coordinates are of pixel centres.
    """
    if not plan.nodules:
        return []
    cx, cy, radius = nodule_cross_sections(plan, slice_index, slice_geometry(plan, slice_index))
    grid = PixelGrid(plan.matrix, plan.pixel_spacing_mm)
    return [
        (grid.index(float(y)), grid.index(float(x)), float(r) * max(n.aspect, 1.0) * (1 + n.lobulation) / grid.spacing)
        for x, y, r, n in zip(cx, cy, radius, plan.nodules)
    ]


def lesion_rows(plans: Sequence[PatientPlan]) -> list[LesionSidecarRow]:
    """One lesions.csv row per nodule cross-section, keyed by the file's path under dicom/ (see
    tasks/ingest/lesions.py)."""
    rows: list[LesionSidecarRow] = []
    for plan in plans:
        series = plan.series_dir(Path()).as_posix()
        for j in range(plan.slices):
            for lesion, (row, col, radius) in enumerate(nodule_discs(plan, j)):
                rows.append(LesionSidecarRow(path=f"{series}/{plan.file_name(j)}", frame=0, lesion=lesion,
                                             center_row=round(row, 3), center_col=round(col, 3),
                                             radius_px=round(radius, 3)))
    return rows
