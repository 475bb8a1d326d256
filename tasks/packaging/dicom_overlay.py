"""A GradCAM overlay per study as a DICOM Secondary Capture, beside the study's SR: where the model looked on the
study's highest-scored image, for a reader in the archive's viewer.

The image is the model's own input (the CT window, padded to a square, at the ingest size) in grey, with the GradCAM
map of the positive class (tasks.saliency.saliency.network_maps, the comparison's method) blended in red. The object
is marked DERIVED / SECONDARY, its series says "derived, not for diagnosis", and it carries the source study's
identifiers: written under PRED_DIR/private/ only and sent to the archive the study came from.
"""

from __future__ import annotations

from collections import defaultdict
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydicom.uid import generate_uid

from data_schemas.dataset import PRIVATE_INDEX_FILE, PrivateIndexRow
from data_schemas.files import atomic_write_bytes, read_models_csv
from data_schemas.package import PREDICT_DATASET_DIR, PREDICTIONS_FILE, ImagePrediction
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.package import float_model, load_package
from tasks.saliency.saliency import network_maps, target_layer

OVERLAY_DIR = "private/dicom-overlay"
OVERLAY_SERIES_NUMBER = 9902
OVERLAY_SERIES_DESCRIPTION = "ctcompare GradCAM overlay - derived, not for diagnosis"
OVERLAY_ALPHA = 0.5  # the map's weight where it is 1
PRIVATE_FILE_MODE = 0o600


def overlay_rgb(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(S, S) grey image and (S, S) map, both in [0, 1] -> (S, S, 3) uint8: grey, blended towards red by the map."""
    grey = np.clip(image, 0, 1)[..., None].repeat(3, axis=2)
    alpha = (OVERLAY_ALPHA * np.clip(heat, 0, 1))[..., None]
    red = np.zeros_like(grey)
    red[..., 0] = 1.0
    return np.round(255 * ((1 - alpha) * grey + alpha * red)).astype(np.uint8)


def write_study_overlays(package_path: Path, pred_dir: Path, source_dir: Path) -> list[Path]:
    """One Secondary Capture per study of a predict run (its highest-scored image with the GradCAM map), written
    owner-only under PRED_DIR/private/dicom-overlay/; none for a linear-probe package (its probe has no map)."""
    package = load_package(package_path)
    meta = package.meta
    if meta.kind == "linear-probe":
        return []
    dataset = load_dataset(pred_dir / PREDICT_DATASET_DIR, in_memory=True)
    position = {row.image_key: i for i, row in enumerate(dataset.manifest)}
    index = {row.image_key: row for row in
             read_models_csv(pred_dir / PREDICT_DATASET_DIR / PRIVATE_INDEX_FILE, PrivateIndexRow)}
    studies: dict[str, list[tuple[float, str, pydicom.Dataset]]] = defaultdict(list)
    for prediction in read_models_csv(pred_dir / PREDICTIONS_FILE, ImagePrediction):
        header = pydicom.dcmread(source_dir / index[prediction.image_key].relative_path, stop_before_pixels=True)
        studies[str(header.StudyInstanceUID)].append((prediction.prob_positive, prediction.image_key, header))
    model = float_model(meta, package.state_dict)
    folder = pred_dir / OVERLAY_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = []
    for study_uid in sorted(studies):
        _, image_key, header = max(studies[study_uid], key=lambda item: (item[0], item[1]))
        image = dataset.images[position[image_key]]
        heat = network_maps(model, image[None], meta.recipe.train_image_size, target_layer(meta.arm))[0]
        secondary = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header, pixel_array=overlay_rgb(image[0].astype(np.float32), heat),
            photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=generate_uid(entropy_srcs=[study_uid, package.sha256, "overlay-series"]),
            series_number=OVERLAY_SERIES_NUMBER,
            sop_instance_uid=generate_uid(entropy_srcs=[study_uid, package.sha256, "overlay"]),
            instance_number=1, manufacturer="ctcompare", patient_orientation=("L", "P"),
        )
        secondary.Modality = "OT"  # not CT: a later CT ingest from the archive never takes it for a scan
        secondary.SeriesDescription = OVERLAY_SERIES_DESCRIPTION
        secondary.ImageComments = "GradCAM of the AI model's positive class on its input; not for diagnosis"
        secondary.BurnedInAnnotation = "NO"
        secondary.DerivationDescription = f"ctcompare {meta.arm}: GradCAM ({target_layer(meta.arm)}) over the input"
        secondary.SourceImageSequence = [pydicom.Dataset()]
        secondary.SourceImageSequence[0].ReferencedSOPClassUID = header.SOPClassUID
        secondary.SourceImageSequence[0].ReferencedSOPInstanceUID = header.SOPInstanceUID
        buffer = BytesIO()
        secondary.save_as(buffer, enforce_file_format=True)
        path = folder / f"{secondary.SOPInstanceUID}.dcm"
        atomic_write_bytes(path, buffer.getvalue(), mode=PRIVATE_FILE_MODE)
        paths.append(path)
    return paths


@task(name="write-dicom-overlay", cache_policy=NO_CACHE)
def write_study_overlays_task(package_path: Path, pred_dir: Path, source_dir: Path) -> list[Path]:
    """One GradCAM secondary capture per predicted study, into PRED_DIR's private folder."""
    return write_study_overlays(package_path, pred_dir, source_dir)
