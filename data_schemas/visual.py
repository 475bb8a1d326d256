"""Schemas of lesion positions and of the report's visual section (example images, saliency, shortcut check).

Lesion files (see docs/lesions.md):
    <cohort>/lesions.csv   LesionSidecarRow per lesion cross-section, keyed by the file's path under the DICOM
                           folder given to ingest (the same `path` key a labels file may use), in the stored pixel
                           grid. An input file like labels.csv: the path may hold names, so it stays beside the
                           DICOM files and never goes into a dataset's shareable part or a report.
    <dataset>/lesions.csv  ImageLesionRow per lesion, keyed by the pseudonymous image_key, in the images.npy grid
                           (after the same padding and resize as the pixels). Shareable.

The visual summary (VisualSummary) is built from the shareable part of a dataset and the run folders only:
thumbnails are PNG data URIs, captions carry pseudonymous keys, never identifiers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data_schemas.base import StrictModel

VISUAL_SCHEMA_VERSION = "1.0"

LESIONS_SIDECAR_FILE = "lesions.csv"
DATASET_LESIONS_FILE = "lesions.csv"
# Only inline PNGs: a report never loads anything from elsewhere, and nothing but an image can sit in src="...".
PNG_DATA_URI_PREFIX = "data:image/png;base64,"
PNG_DATA_URI_PATTERN = r"^data:image/png;base64,[A-Za-z0-9+/]+={0,2}$"

GRADCAM_MEANS = (
    "A GradCAM map shows which regions of the last convolutional stage's features raised the network's "
    "\"nodule\" score for this slice: bright means that region pushed the score up."
)
GRADCAM_DOES_NOT_MEAN = (
    "It does not show what the network would call a nodule, nor that the bright region is a nodule: it is coarse "
    "(one cell per 32 pixels of the network input), it is rescaled to [0, 1] per slice so a weak map looks as "
    "bright as a strong one, and a bright region may be a shortcut such as the table or the body outline."
)
LINEAR_PROBE_NO_MAP = (
    "No map is shown for the linear-probe arm: its classifier is a logistic regression stored outside the network "
    "(linear_model.json) on frozen ImageNet features, so the network has no trained layer whose gradient "
    "GradCAM could read; a map of the frozen backbone would show ImageNet features, not what the probe learned."
)
POINTING_GAME_MEANS = (
    "Pointing game: the share of positive test slices whose saliency maximum lies inside a true nodule, "
    "with a 95% bootstrap interval that resamples patients; compare it with the share of the image the nodules "
    "cover, which is what a map pointing at random would score."
)

SelectionReason = Literal["confident_tp", "worst_fp", "worst_fn", "random"]
SELECTION_REASON_TEXT: dict[str, str] = {
    "confident_tp": "most confident true positive",
    "worst_fp": "highest-scored normal slice",
    "worst_fn": "lowest-scored nodule slice",
    "random": "random slice",
}


class LesionSidecarRow(StrictModel):
    """One lesion cross-section in one DICOM frame, in the stored pixel grid (row 0, column 0 = first pixel centre).

    Args:
        path: the file's path relative to the DICOM folder given to ingest, with '/' separators.
        frame: frame number in a multi-frame file (0 for single-frame files).
        lesion: index of the lesion within this frame (0, 1, ...).
        center_row: row of the lesion centre, in pixels (fractions allowed).
        center_col: column of the lesion centre, in pixels.
        radius_px: radius of the circle enclosing the lesion, in pixels.
    """

    path: str
    frame: int = Field(default=0, ge=0)
    lesion: int = Field(default=0, ge=0)
    center_row: float
    center_col: float
    radius_px: float = Field(gt=0)


class ImageLesionRow(StrictModel):
    """One lesion in one dataset image, in the images.npy grid. Shareable: keyed by the pseudonymous image_key.

    Args:
        image_key: the image's key in manifest.csv.
        lesion: index of the lesion within this image.
        center_row: row of the lesion centre in the S x S image, in pixels.
        center_col: column of the lesion centre, in pixels.
        radius_px: radius in pixels of the S x S image.
    """

    image_key: str
    lesion: int = Field(ge=0)
    center_row: float
    center_col: float
    radius_px: float = Field(gt=0)


class Thumbnail(StrictModel):
    """One small image for the report.

    Args:
        data_uri: 'data:image/png;base64,...' (8-bit PNG, at most 128 px a side).
        caption: plain text with pseudonymous keys only; the renderer escapes it.
    """

    data_uri: str = Field(pattern=PNG_DATA_URI_PATTERN)
    caption: str


class ExampleGroup(StrictModel):
    """Example slices of one class (and one scanner manufacturer when the manifest names it).

    Args:
        label: the class name.
        manufacturer: the scanner manufacturer, or '' when the group is per class only.
        n_images: images of this group in the dataset.
        thumbnails: a few examples, chosen with the seed.
    """

    label: str
    manufacturer: str = ""
    n_images: int
    thumbnails: list[Thumbnail]


class ClassIntensity(StrictModel):
    """The mean image and pixel-value histogram of one class, from images.npy.

    Args:
        label: the class name.
        n_images: images averaged.
        mean_image: the mean image as a thumbnail.
        bin_edges: histogram bin edges over [0, 1] (len = len(density) + 1).
        density: share of the class's pixels in each bin (sums to 1).
    """

    label: str
    n_images: int
    mean_image: Thumbnail
    bin_edges: list[float]
    density: list[float]


class DatasetGallery(StrictModel):
    """The dataset card's pictures.

    Args:
        image_size: side of the images in images.npy.
        grouped_by: 'label and manufacturer' or 'label' (the manifest names no manufacturer).
        groups: example grid, one group per row.
        classes: mean image and histogram per class.
    """

    image_size: int
    grouped_by: str
    groups: list[ExampleGroup]
    classes: list[ClassIntensity]


class SelectedSlice(StrictModel):
    """One test slice shown for every arm.

    Args:
        image_key: pseudonymous key of the slice.
        patient_key: pseudonymous key of its patient.
        label: the true class.
        target: 1 for the positive class.
        reason: why it was chosen.
        mean_prob_positive: positive-class probability averaged over the arms (the selection score).
    """

    image_key: str
    patient_key: str
    label: str
    target: int = Field(ge=0, le=1)
    reason: SelectionReason
    mean_prob_positive: float


class PointingGame(StrictModel):
    """The shortcut check of one arm (only when lesion positions are known).

    Args:
        n_slices: positive test slices with a known lesion that were scored.
        n_patients: patients those slices come from (the bootstrap resamples them).
        hit_rate: share of those slices whose saliency maximum lies inside a lesion.
        ci_low: lower end of the 95% percentile bootstrap interval by patient.
        ci_high: upper end.
        mass_inside: share of the saliency mass inside the lesions (mean over slices).
        area_fraction: share of the image the lesions cover (mean over slices): the chance level of both numbers.
    """

    n_slices: int
    n_patients: int
    hit_rate: float
    ci_low: float
    ci_high: float
    mass_inside: float
    area_fraction: float


class ArmSaliency(StrictModel):
    """The saliency panel of one arm.

    Args:
        arm: the arm's name.
        available: False when no map is shown (see note).
        note: why no map is shown, or '' when one is.
        target_layer: the layer GradCAM read (e.g. 'layer4').
        overlays: one colour overlay per selected slice, in the selection's order.
        probs: this arm's positive-class probability per selected slice, same order.
        seconds: wall time to compute the maps.
        pointing_game: the shortcut check, when lesions are known.
    """

    arm: str
    available: bool
    note: str = ""
    target_layer: str = ""
    overlays: list[Thumbnail] = Field(default_factory=list)
    probs: list[float] = Field(default_factory=list)
    seconds: float = 0.0
    pointing_game: PointingGame | None = None


class VisualSummary(StrictModel):
    """Everything the report's visual section needs, built from shareable files only.

    Args:
        dataset: the dataset card's pictures.
        slices: the fixed selection of test slices, the same for every arm.
        images: the selected slices without overlay, same order.
        arms: one saliency panel per arm.
        lesions_known: True when the dataset has lesions.csv (the shortcut check is shown).
        method: e.g. 'GradCAM (monai.visualize) at layer4, positive class'.
        seed: the seed of the random picks.
        means, does_not_mean, pointing_game_means: explanation sentences.
    """

    schema_version: Literal["1.0"] = VISUAL_SCHEMA_VERSION
    dataset: DatasetGallery
    slices: list[SelectedSlice]
    images: list[Thumbnail]
    arms: list[ArmSaliency]
    lesions_known: bool
    method: str
    seed: int
    means: str = GRADCAM_MEANS
    does_not_mean: str = GRADCAM_DOES_NOT_MEAN
    pointing_game_means: str = POINTING_GAME_MEANS
