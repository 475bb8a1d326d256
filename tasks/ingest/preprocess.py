"""The documented conversion of a CT frame in Hounsfield units to a model-ready grayscale image.

Order (every image, every dataset): HU -> window to [0, 1] (clip) -> MONOCHROME1 inverted (1 - v) ->
zero-pad to a square, centred (0 = the bottom of the window) -> resize to size x size with bicubic,
antialiased interpolation (torch.nn.functional.interpolate, the same filter as PIL's) -> clip to [0, 1].
"""

from __future__ import annotations

import re

import numpy as np

from data_schemas.dataset import WindowSpec

# Standard radiology display windows (level, width) in HU.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinal": (40.0, 400.0),
    "bone": (400.0, 1800.0),
}
# "none" keeps the whole 12-bit CT range: [-1024, 3072) HU.
FULL_RANGE_LEVEL_WIDTH = (1024.0, 4096.0)
WINDOW_CHOICES = (*NAMED_WINDOWS, "none", "WL,WW")


def parse_window(text: str) -> WindowSpec:
    """Parse a window option: a named window (lung, mediastinal, bone, none) or 'LEVEL,WIDTH' in HU."""
    name = text.strip().lower()
    if name in NAMED_WINDOWS:
        level, width = NAMED_WINDOWS[name]
        return WindowSpec(name=name, level=level, width=width)
    if name == "none":
        return WindowSpec(name="none", level=None, width=None)
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*", text)
    if match and float(match.group(2)) > 0:
        return WindowSpec(name="custom", level=float(match.group(1)), width=float(match.group(2)))
    raise ValueError(
        f"unknown window {text!r}; valid choices are {', '.join(WINDOW_CHOICES)} "
        "(e.g. '-600,1500': level and a positive width in HU)"
    )


def window_level_width(window: WindowSpec) -> tuple[float, float]:
    """The (level, width) a window applies; 'none' maps the full CT range."""
    if window.level is None or window.width is None:
        return FULL_RANGE_LEVEL_WIDTH
    return window.level, window.width


def window_to_unit_range(hu: np.ndarray, window: WindowSpec) -> np.ndarray:
    """Map HU linearly so [level - width/2, level + width/2] becomes [0, 1], clipping outside."""
    level, width = window_level_width(window)
    low = level - width / 2.0
    return np.clip((hu.astype(np.float32) - low) / width, 0.0, 1.0)


def pad_to_square(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Zero-pad a 2D image to a centred square; returns the image and (top, bottom, left, right)."""
    rows, cols = image.shape
    side = max(rows, cols)
    top = (side - rows) // 2
    left = (side - cols) // 2
    pads = (top, side - rows - top, left, side - cols - left)
    if side == rows == cols:
        return image, pads
    return np.pad(image, ((pads[0], pads[1]), (pads[2], pads[3])), mode="constant", constant_values=0.0), pads


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bicubic antialiased resize of a square 2D image to size x size, clipped to [0, 1]."""
    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    import torch  # here, not at import: an ingest that decodes nothing new never loads torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0, 0].clamp_(0.0, 1.0).numpy()


def source_point_to_image(row: float, col: float, *, rows: int, pads: tuple[int, int, int, int],
                           size: int) -> tuple[float, float, float]:
    """Where a stored pixel position lands after pad_to_square and resize_square: (row, col, scale factor).

    pads is (top, bottom, left, right) as pad_to_square returned it (and the manifest records). Pixel centres
    map as resize_square's align_corners=False sampling does: x' = (x + pad + 0.5) * size / side - 0.5; a length
    (a lesion radius) scales by size / side.
    """
    side = rows + pads[0] + pads[1]
    scale = size / side
    return (row + pads[0] + 0.5) * scale - 0.5, (col + pads[2] + 0.5) * scale - 0.5, scale


def hu_frame_to_image(
    hu: np.ndarray, window: WindowSpec, size: int, monochrome1: bool
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Convert one HU frame to a size x size float32 image in [0, 1]; returns it and the padding used."""
    unit = window_to_unit_range(hu, window)
    if monochrome1:
        # MONOCHROME1 displays low values bright; flip so that bright means dense for every image.
        unit = 1.0 - unit
    square, pads = pad_to_square(unit)
    return resize_square(square, size), pads
