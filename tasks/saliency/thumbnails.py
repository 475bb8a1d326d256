"""Small PNG pictures for the report, from the shareable images.npy only: example slices, class means, overlays.

Compression: 8-bit grayscale PNG (one byte a pixel before deflate) for slices and means, indexed-colour PNG
(OVERLAY_COLORS colours) for saliency overlays, at most 128 px a side (MAX_THUMBNAIL_SIDE). Measured at 112 px on
the synthetic demo: a slice about 6 kB, an overlay about 7 kB (11 kB as RGB). Captions hold pseudonymous keys only
(their first KEY_CHARS characters).
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from data_schemas.dataset import ManifestRow
from data_schemas.visual import ClassIntensity, DatasetGallery, ExampleGroup, Thumbnail

MAX_THUMBNAIL_SIDE = 128
KEY_CHARS = 8  # enough to find a row in manifest.csv, short enough for a caption
OVERLAY_ALPHA = 0.45
COLORMAP = "inferno"  # perceptually uniform; dark where the map is 0, so the slice shows through
HISTOGRAM_BINS = 50
OVERLAY_COLORS = 128  # indexed PNG: about 35% smaller than RGB at 112 px, no visible banding


def short_key(key: str) -> str:
    """The first KEY_CHARS characters of a pseudonymous key, for captions."""
    return key[:KEY_CHARS]


def resize_to(image: np.ndarray, side: int) -> np.ndarray:
    """Resize a 2D float image to side x side (antialiased bilinear); unchanged when already that size."""
    if image.shape == (side, side):
        return np.asarray(image, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _thumbnail_side(side: int) -> int:
    return min(side, MAX_THUMBNAIL_SIDE)


def png_data_uri(pixels: np.ndarray, *, palette_colors: int | None = None) -> str:
    """A 'data:image/png;base64,' URI of a uint8 (H, W) grayscale or (H, W, 3) RGB array.

    palette_colors: store an RGB image as an indexed PNG with at most this many colours (median cut).
    """
    image = Image.fromarray(pixels)
    if palette_colors is not None:
        image = image.quantize(colors=palette_colors, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True, compress_level=9)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def gray_thumbnail(image: np.ndarray, caption: str) -> Thumbnail:
    """A [0, 1] slice as an 8-bit grayscale PNG thumbnail."""
    small = resize_to(image, _thumbnail_side(image.shape[-1]))
    return Thumbnail(data_uri=png_data_uri(np.rint(np.clip(small, 0, 1) * 255).astype(np.uint8)), caption=caption)


def overlay_thumbnail(image: np.ndarray, saliency: np.ndarray, caption: str) -> Thumbnail:
    """A [0, 1] slice with a [0, 1] saliency map blended over it in COLORMAP, as an 8-bit RGB PNG thumbnail."""
    side = _thumbnail_side(image.shape[-1])
    gray = np.clip(resize_to(image, side), 0, 1)[..., None]
    heat = colormaps[COLORMAP](np.clip(resize_to(saliency, side), 0, 1))[..., :3]
    # Weight the colour by the map itself so that regions the map ignores show the plain slice.
    weight = OVERLAY_ALPHA * np.clip(resize_to(saliency, side), 0, 1)[..., None]
    blended = (1 - weight) * gray + weight * heat
    return Thumbnail(data_uri=png_data_uri(np.rint(blended * 255).astype(np.uint8), palette_colors=OVERLAY_COLORS),
                     caption=caption)


def _example_groups(images: np.ndarray, manifest: list[ManifestRow], per_group: int,
                    rng: np.random.Generator) -> tuple[list[ExampleGroup], str]:
    by_manufacturer = any(row.manufacturer for row in manifest)
    members: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, row in enumerate(manifest):
        if row.label:
            members[(row.label, row.manufacturer if by_manufacturer else "")].append(i)
    groups = []
    for (label, maker), rows in sorted(members.items()):
        picked = sorted(rng.choice(rows, size=min(per_group, len(rows)), replace=False).tolist())
        thumbs = [gray_thumbnail(np.asarray(images[i, 0], dtype=np.float32),
                                 f"{label} · image {short_key(manifest[i].image_key)}") for i in picked]
        groups.append(ExampleGroup(label=label, manufacturer=maker, n_images=len(rows), thumbnails=thumbs))
    return groups, "label and manufacturer" if by_manufacturer else "label"


def _class_intensities(images: np.ndarray, manifest: list[ManifestRow]) -> list[ClassIntensity]:
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    out = []
    for label in sorted({row.label for row in manifest if row.label}):
        rows = [i for i, row in enumerate(manifest) if row.label == label]
        total = np.zeros(images.shape[-2:], dtype=np.float64)
        counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        for start in range(0, len(rows), 256):  # blocks: images.npy may be memory-mapped and large
            block = np.asarray(images[rows[start:start + 256], 0], dtype=np.float32)
            total += block.sum(axis=0)
            counts += np.histogram(block, bins=edges)[0]
        mean = (total / len(rows)).astype(np.float32)
        out.append(ClassIntensity(label=label, n_images=len(rows),
                                  mean_image=gray_thumbnail(mean, f"mean of {len(rows)} {label} images"),
                                  bin_edges=[round(float(e), 4) for e in edges],
                                  density=[float(c) for c in counts / max(int(counts.sum()), 1)]))
    return out


def dataset_gallery(images: np.ndarray, manifest: list[ManifestRow], *, per_group: int = 3,
                    seed: int = 0) -> DatasetGallery:
    """Example slices per class (and manufacturer, when the manifest names it), mean image and histogram per class."""
    groups, grouped_by = _example_groups(images, manifest, per_group, np.random.default_rng([seed, 12]))
    return DatasetGallery(image_size=int(images.shape[-1]), grouped_by=grouped_by, groups=groups,
                          classes=_class_intensities(images, manifest))
