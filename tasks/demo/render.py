"""Rendering a patient's slices in Hounsfield units with vectorised numpy, and their stored pixel values."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from tasks.demo.geometry import Ellipse, PixelGrid, SliceGeometry, nodule_cross_sections, slice_geometry
from tasks.demo.patients import PatientPlan, ScannerProfile


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


def _paint(image: np.ndarray, grid: PixelGrid, e: Ellipse, value: float) -> None:
    rows, cols, inside = grid.window(e)
    image[rows, cols][inside] = value


@dataclass(frozen=True)
class Blobs:
    """Rotated ellipses in mm (arrays, one entry per blob), optionally lobulated: radius x (1 + lobulation x
    cos(lobes x phi + lobe_phase))."""

    cx: np.ndarray
    cy: np.ndarray
    semi_a: np.ndarray
    semi_b: np.ndarray
    angle: np.ndarray
    lobulation: np.ndarray | None = None
    lobes: np.ndarray | None = None
    lobe_phase: np.ndarray | None = None


def _blobs(image: np.ndarray, grid: PixelGrid, blobs: Blobs, value: np.ndarray, edge_mm: np.ndarray,
           where: np.ndarray | None = None) -> None:
    """Blend soft-edged rotated ellipses into the image (optionally only where `where` is True)."""
    cx, cy, semi_a, semi_b, angle = blobs.cx, blobs.cy, blobs.semi_a, blobs.semi_b, blobs.angle
    lobulation, lobes, lobe_phase = blobs.lobulation, blobs.lobes, blobs.lobe_phase
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


def _ring_blobs(image: np.ndarray, grid: PixelGrid, bones: Blobs, cortex_hu: np.ndarray, marrow_hu: float,
                cortex_mm: float) -> None:
    """Bones in cross-section: a bright cortical shell around a dimmer marrow core."""
    edge = np.full_like(bones.cx, 0.4)
    _blobs(image, grid, bones, cortex_hu, edge)
    marrow = Blobs(bones.cx, bones.cy, np.maximum(bones.semi_a - cortex_mm, 0.5),
                   np.maximum(bones.semi_b - cortex_mm, 0.5), bones.angle)
    _blobs(image, grid, marrow, np.full_like(bones.cx, marrow_hu), edge)


@dataclass(frozen=True)
class _StaticBody:
    """The parts of a patient's slices that do not change along z."""

    image: np.ndarray  # air, fat, chest-wall muscle, thoracic cavity, table (HU)
    body_mask: np.ndarray
    cavity_mask: np.ndarray  # where lung may be: inside the ribs


def _static_body(plan: PatientPlan, grid: PixelGrid) -> _StaticBody:
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


def _render_slice(plan: PatientPlan, slice_index: int, grid: PixelGrid, static: _StaticBody,
                  include_nodules: bool = True) -> np.ndarray:
    """One slice in HU: the static body, lungs, vessels, nodules, the structures over them, blur and noise."""
    geometry = slice_geometry(plan, slice_index)
    offset_mm = slice_index * plan.slice_thickness_mm
    image = static.image.copy()
    srng = np.random.default_rng([plan.seed, 7_304, plan.index, slice_index])
    lung_mask = _paint_lungs(image, plan, grid, geometry, static, offset_mm)
    _paint_vessels(image, plan, grid, geometry, lung_mask, offset_mm)
    if include_nodules and plan.nodules:
        _paint_nodules(image, plan, slice_index, grid, geometry, lung_mask)
    _paint_structures(image, plan, grid, geometry, offset_mm, srng)
    image = _partial_volume(image)
    _add_scanner_noise(image, plan, grid, static.body_mask, srng)
    return image


def _paint_lungs(image: np.ndarray, plan: PatientPlan, grid: PixelGrid, geometry: SliceGeometry,
                 static: _StaticBody, offset_mm: float) -> np.ndarray:
    """Lung parenchyma painted into image; returns the lung mask.

    Two ellipses cut by the chest wall, so their lateral edge follows the ribs. Parenchyma: base density, a smooth
    texture that drifts a little from slice to slice, and denser dependent (posterior) lung, as in a supine patient.
    """
    lung_mask = np.zeros(image.shape, dtype=bool)
    for lung in geometry.lungs:
        rows, cols, inside = grid.window(lung)
        lung_mask[rows, cols] |= inside
    lung_mask &= static.cavity_mask
    # One cached field per matrix size (about 2.5 mm correlation at typical spacing), cropped per patient.
    texture = _crop_field(_correlated_field(plan.seed, grid.size, 3.3 * grid.size / 512, 1), grid.size,
                          (plan.texture_offset[0] + int(offset_mm * 0.8 / grid.spacing), plan.texture_offset[1]), 0)
    lung_top = geometry.lungs[0].cy - geometry.lungs[0].ay
    dependent = np.clip((grid.coords - lung_top) / (2 * geometry.lungs[0].ay), 0, 1) ** 2 * 70.0
    lung_values = plan.lung_hu + plan.lung_texture_hu * texture + dependent[:, None]
    image[lung_mask] = lung_values[lung_mask]
    return lung_mask


def _paint_vessels(image: np.ndarray, plan: PatientPlan, grid: PixelGrid, geometry: SliceGeometry,
                   lung_mask: np.ndarray, offset_mm: float) -> None:
    """The vessel tubes that cross this slice, as small bright blobs (elongated when running in-plane)."""
    vt = plan.vessels
    present = np.abs(offset_mm - vt.z_center_mm) < vt.z_half_length_mm
    if not present.any():
        return
    side = vt.side[present]
    lung_cx = np.where(side < 0, geometry.lungs[0].cx, geometry.lungs[1].cx)
    lung_ax, lung_ay, lung_cy = geometry.lungs[0].ax, geometry.lungs[0].ay, geometry.lungs[0].cy
    u = vt.u[present] + vt.du_per_mm[present] * offset_mm
    v = vt.v[present] + vt.dv_per_mm[present] * offset_mm
    cx, cy = lung_cx + u * lung_ax, lung_cy + v * lung_ay
    # In-plane vessels point away from the hilum.
    angle = np.arctan2(v + 0.1, u + side * 0.7)
    radius = vt.radius_mm[present]
    _blobs(image, grid, Blobs(cx, cy, radius * vt.aspect[present], radius, angle), vt.peak_hu[present],
           np.full_like(cx, 0.5), where=lung_mask)


def _paint_nodules(image: np.ndarray, plan: PatientPlan, slice_index: int, grid: PixelGrid, geometry: SliceGeometry,
                   lung_mask: np.ndarray) -> None:
    """Every nodule's cross-section in this slice, soft-edged and lobulated, inside the lungs only."""
    cx, cy, radius = nodule_cross_sections(plan, slice_index, geometry)
    aspect = np.array([n.aspect for n in plan.nodules])
    nodules = Blobs(cx, cy, radius * aspect, radius, np.array([n.angle for n in plan.nodules]),
                    lobulation=np.array([n.lobulation for n in plan.nodules]),
                    lobes=np.array([n.lobes for n in plan.nodules], dtype=np.float64),
                    lobe_phase=np.array([n.lobe_phase for n in plan.nodules]))
    _blobs(image, grid, nodules, np.array([n.core_hu for n in plan.nodules]),
           np.array([n.edge_mm for n in plan.nodules]), where=lung_mask)


def _paint_structures(image: np.ndarray, plan: PatientPlan, grid: PixelGrid, geometry: SliceGeometry,
                      offset_mm: float, srng: np.random.Generator) -> None:
    """Structures over the lungs: mediastinum and heart, posterior muscles, aorta, airways, spine, sternum, ribs."""
    _paint(image, grid, geometry.mediastinum, 38.0)
    _paint(image, grid, geometry.paraspinal, 48.0)
    _paint(image, grid, geometry.aorta, 42.0)
    for airway in geometry.airways:
        _paint(image, grid, Ellipse(airway.cx, airway.cy, airway.ax + 1.8, airway.ay + 1.8), 60.0)
        _paint(image, grid, airway, -990.0)
    vb, canal = geometry.vertebral_body, geometry.spinal_canal
    spine_cx = np.array([vb.cx, -19.0, 19.0, 0.0])
    spine_cy = np.array([vb.cy, canal.cy + 3.0, canal.cy + 3.0, canal.cy + 17.0])
    spine = Blobs(spine_cx, spine_cy, np.array([vb.ax, 11.0, 11.0, 4.5]), np.array([vb.ay, 5.0, 5.0, 11.0]),
                  np.array([0.0, -0.35, 0.35, 0.0]))
    _ring_blobs(image, grid, spine, np.array([880.0, 760.0, 760.0, 720.0]), 230.0, 2.2)
    _paint(image, grid, canal, 25.0)
    st = geometry.sternum
    sternum = Blobs(np.array([st.cx]), np.array([st.cy]), np.array([st.ax]), np.array([st.ay]), np.array([0.0]))
    _ring_blobs(image, grid, sternum, np.array([520.0]), 180.0, 1.6)
    angles = plan.rib_angles + plan.rib_drift_per_mm * offset_mm
    ring = geometry.rib_ring
    rib_x, rib_y = ring.cx + ring.ax * np.cos(angles), ring.cy + ring.ay * np.sin(angles)
    tangent = np.arctan2(ring.ay * np.cos(angles), -ring.ax * np.sin(angles))
    ribs = Blobs(rib_x, rib_y, plan.rib_size_mm[:, 0], plan.rib_size_mm[:, 1], tangent)
    _ring_blobs(image, grid, ribs, np.full(len(angles), 900.0) + srng.normal(0, 40, len(angles)), 260.0, 1.3)


def _partial_volume(image: np.ndarray) -> np.ndarray:
    """Partial volume: a light separable [1 2 1]/4 blur softens the hard painted edges."""
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
    return image


def _add_scanner_noise(image: np.ndarray, plan: PatientPlan, grid: PixelGrid, body_mask: np.ndarray,
                       srng: np.random.Generator) -> None:
    """Scanner noise: slightly correlated, stronger through the body than in the air around it."""
    scanner = plan.scanner
    noise_sigma_px = scanner.noise_correlation_px * (grid.size / 512) ** 0.5
    noise = _crop_field(_correlated_field(plan.seed, grid.size, noise_sigma_px, 100 + plan.scanner_index),
                        grid.size, (int(srng.integers(0, grid.size)), int(srng.integers(0, grid.size))),
                        int(srng.integers(0, 8)))
    image += noise * np.where(body_mask, scanner.noise_sigma_hu, 0.7 * scanner.noise_sigma_hu).astype(np.float32)


def render_patient_hu(plan: PatientPlan, include_nodules: bool = True) -> Iterator[np.ndarray]:
    """Yield each slice of a patient in Hounsfield units (float32, before storage clipping)."""
    grid = PixelGrid(plan.matrix, plan.pixel_spacing_mm)
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
