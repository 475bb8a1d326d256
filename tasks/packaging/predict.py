"""Running a model package on newly ingested images: recipe checks, batched inference, predictions per image and
patient.

The new DICOM files are ingested by the ordinary ingest flow with the package's own window and size (flows/predict.py),
so validation, quarantine, pseudonymization and conversion are the ones the model was trained with. Here: refuse a
request that would not reproduce the recipe (one sentence, before any work), check the ingested dataset's recorded
recipe again, then predict and write the files described in data_schemas/package.py.

The predictions are the clinical output: each row names the source file (relative to the predicted folder) and its
Study, Series and SOP Instance UIDs, each patient its source PatientID, read back from the files the ingest kept
(the dataset's private index), so a reader can act on them. They are therefore written owner-only (0600) into an
owner-only folder (0700), and predict.json lists them as identifier files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_schemas.dataset import PRIVATE_INDEX_FILE, DatasetCard, PrivateIndexRow, WindowSpec
from data_schemas.files import read_models_csv, write_model_json, write_models_csv
from data_schemas.package import (
    PATIENT_PREDICTIONS_FILE,
    PREDICT_SUMMARY_FILE,
    PREDICTIONS_FILE,
    ImagePrediction,
    ModelPackageMeta,
    PatientPrediction,
    PredictSummary,
)
from tasks.common.runtime import Runtime, choose_runtime, torch_threads
from tasks.ingest.dataset_store import load_dataset
from tasks.ingest.decode import PREPROCESS_VERSION
from tasks.ingest.preprocess import NAMED_WINDOWS, parse_window, window_level_width
from tasks.packaging.package import TRAIN_RESIZE_METHOD, LoadedPackage, float_model, load_package
from tasks.packaging.quantize import int8_model
from tasks.training.augment import images_to_tensor
from tasks.training.linear_probe import predict_linear_probe

PRECISION_CHOICES = ("auto", "fp32", "bf16")
RESIZE_CHUNK = 256  # images resized to the training size at a time: bounds memory on large folders
IDENTIFIER_FILE_MODE, IDENTIFIER_DIR_MODE = 0o600, 0o700
SOURCE_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


class RecipeConflict(ValueError):
    """The package's preprocessing recipe cannot be reproduced for this request: one sentence."""


@dataclass
class PackagedModel:
    """A package ready to run: the torch module, how to turn its output into probabilities, and its runtime.

    Args:
        package: the loaded package.
        module: the network (classifier, or feature extractor for a linear probe).
        runtime: device, autocast precision, memory format and threads.
        precision: the compute precision as reported (fp32, bf16 or int8).
    """

    package: LoadedPackage
    module: torch.nn.Module
    runtime: Runtime
    precision: str

    def probabilities(self, outputs: torch.Tensor) -> np.ndarray:
        """Positive-class probabilities from the module's outputs (logits, or features for a linear probe)."""
        probe = self.package.meta.linear_probe
        if probe is not None:
            return predict_linear_probe(probe, outputs.float().numpy())
        return torch.softmax(outputs.float(), dim=1)[:, 1].numpy()


# ---------------------------------------------------------------------------------------------- recipe checks


def window_argument(window: WindowSpec) -> str:
    """The ingest --window text that reproduces a recorded window (a name when it is a named one, else LEVEL,WIDTH)."""
    level, width = window_level_width(window)
    if window.name in NAMED_WINDOWS and NAMED_WINDOWS[window.name] == (level, width) or window.name == "none":
        return window.name
    return f"{_plain(level)},{_plain(width)}"


def _plain(value: float) -> str:
    """A number as ingest's window pattern accepts it: no exponent, no trailing zeros."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _same_window(a: WindowSpec, b: WindowSpec) -> bool:
    """Equal level and width (names aside: 'lung' and '-600,1500' are the same window)."""
    return all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(window_level_width(a), window_level_width(b)))


def check_request(meta: ModelPackageMeta, *, window: str | None = None, size: int | None = None,
                  label_names: set[str] | None = None) -> None:
    """Refuse, before any work, a request the package's recipe cannot serve (RecipeConflict, one sentence)."""
    recipe = meta.recipe
    if recipe.preprocess_version != PREPROCESS_VERSION or recipe.resize_method != TRAIN_RESIZE_METHOD:
        raise RecipeConflict(
            f"this model was trained with conversion recipe version {recipe.preprocess_version} and this ctcompare "
            f"converts with version {PREPROCESS_VERSION}, so its input cannot be reproduced here."
        )
    if window is not None and not _same_window(parse_window(window), recipe.window):
        level, width = window_level_width(recipe.window)
        raise RecipeConflict(
            f"this model was trained on the {recipe.window.name} window (level {_plain(level)}, width "
            f"{_plain(width)} HU), not {window!r}; leave --window out to use the model's own."
        )
    if size is not None and size != recipe.ingest_image_size:
        raise RecipeConflict(
            f"this model's images were ingested at {recipe.ingest_image_size} px (trained at "
            f"{recipe.train_image_size} px), not {size} px; leave --size out to use the model's own."
        )
    unknown = sorted((label_names or set()) - set(meta.classes))
    if unknown:
        raise RecipeConflict(
            f"the labels file names {', '.join(unknown)}, which this model does not know; its classes are "
            f"{', '.join(meta.classes)}."
        )


def check_ingested(meta: ModelPackageMeta, card: DatasetCard) -> None:
    """The ingested dataset must record the package's recipe exactly (window, size, mapping, filter, padding)."""
    recipe = meta.recipe
    recorded = {
        "window": _same_window(card.window, recipe.window), "image size": card.image_size == recipe.ingest_image_size,
        "value mapping": card.value_mapping == recipe.value_mapping,
        "interpolation": card.interpolation == recipe.interpolation, "padding": card.padding == recipe.padding,
    }
    differing = [name for name, same in recorded.items() if not same]
    if differing:
        raise RecipeConflict(
            f"the new files were converted with another {' and '.join(differing)} than the model was trained with, "
            "so its predictions would not mean what its metrics say."
        )


# -------------------------------------------------------------------------------------------------- inference


def default_threads() -> int:
    """The CPUs this process may run on. Set explicitly: ingest's decode tasks leave torch at one thread."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def predict_runtime(meta: ModelPackageMeta, precision: str = "auto", threads: int | None = None) -> Runtime:
    """CPU runtime for a package: bf16 autocast + channels-last where the CPU gains (tasks.common.runtime), else
    fp32; with `threads` (default: default_threads), which the package's forwards run with (Runtime.threads) while
    the rest of the process keeps its own thread count."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision {precision!r} is not valid; choose one of {', '.join(PRECISION_CHOICES)}.")
    threads = threads or default_threads()
    if meta.weights_variant == "int8":  # int8 kernels take fp32 activations; autocast does not apply
        return Runtime(torch.device("cpu"), "fp32", False, threads)
    config = meta.run_config.train.model_copy(update={
        "device": "cpu", "precision": precision, "channels_last": "auto", "num_threads": threads,
    })
    with torch_threads(threads):  # choose_runtime sets the thread count; only the forwards take it
        return choose_runtime(config)


def prepare_model(package: LoadedPackage, precision: str = "auto", threads: int | None = None, *,
                  int8_module: torch.nn.Module | None = None) -> PackagedModel:
    """Build the package's module for its weights variant and put it in the runtime's memory format.

    int8_module: for an int8 package, the converted module its state was taken from (tasks.packaging.quantize),
    run as it is instead of rebuilding it from the state.
    """
    meta = package.meta
    runtime = predict_runtime(meta, precision, threads)
    if meta.weights_variant == "int8":
        module = int8_module if int8_module is not None else int8_model(meta, package.state_dict)
        return PackagedModel(package, module, runtime, "int8")
    if runtime.channels_last:  # converted in place: a model of its own
        module = float_model(meta, package.state_dict).to(memory_format=torch.channels_last)
    else:
        module = package.float_network
    return PackagedModel(package, module, runtime, runtime.precision)


@torch.inference_mode()
def forward_batches(model: PackagedModel, x: torch.Tensor, batch_size: int,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Probabilities of (N, 1, S, S) images in [0, 1] at the training size, normalised by the package's recipe."""
    recipe, runtime = model.package.meta.recipe, model.runtime
    out = []
    with runtime.threads():
        for start in range(0, x.shape[0], batch_size):
            xb = (x[start : start + batch_size] - recipe.normalisation_mean) / recipe.normalisation_std
            if runtime.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                outputs = model.module(xb)
            out.append(model.probabilities(outputs.float()))
            if on_batch is not None:
                on_batch(xb.shape[0])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def predict_images(model: PackagedModel, images: np.ndarray, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Probabilities of ingested images (N, 1, S, S) float16: resized to the training size in chunks, batched."""
    size = model.package.meta.recipe.train_image_size
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=images.shape[0], desc="predict", unit="img")
    probs = []
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        x = images_to_tensor(images[start : start + RESIZE_CHUNK], size)
        probs.append(forward_batches(model, x, batch_size, bar.update if bar is not None else None))
    if bar is not None:
        bar.close()
    return np.clip(np.concatenate(probs) if probs else np.zeros(0), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class SourceImage:
    """Where a predicted image came from: its file (relative to the predicted folder) and DICOM identifiers."""

    source_path: str
    patient_id: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""


def _identifiers(path: Path) -> dict[str, str]:
    """PatientID and the three instance UIDs of one DICOM file (header only); empty when it cannot be read again."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(SOURCE_TAGS), force=True)
        return {tag: str(ds.get(tag, "") or "").strip() for tag in SOURCE_TAGS}
    except Exception:  # noqa: BLE001 - the file was read at ingest; changed or gone since: no identifiers
        return {}


def source_images(dataset_dir: Path, dicom_dir: Path | None) -> dict[str, SourceImage]:
    """image key -> its source file (the dataset's private index) and, when dicom_dir is given, the file's PatientID
    and UIDs (each file's header read once, whatever its number of frames)."""
    index_path = Path(dataset_dir) / PRIVATE_INDEX_FILE
    rows = read_models_csv(index_path, PrivateIndexRow) if index_path.is_file() else []
    headers: dict[str, dict[str, str]] = {}
    sources = {}
    for row in rows:
        if dicom_dir is not None and row.relative_path not in headers:
            headers[row.relative_path] = _identifiers(Path(dicom_dir) / row.relative_path)
        found = headers.get(row.relative_path, {})
        sources[row.image_key] = SourceImage(
            source_path=row.relative_path,
            patient_id=found.get("PatientID", ""),
            study_instance_uid=found.get("StudyInstanceUID", ""),
            series_instance_uid=found.get("SeriesInstanceUID", ""),
            sop_instance_uid=found.get("SOPInstanceUID", ""),
        )
    return sources


def package_warnings(meta: ModelPackageMeta) -> list[str]:
    """What a user of the package's predictions must know: a smoke-profile run, or unverified ImageNet weights."""
    warnings = []
    config = meta.run_config
    if config.profile == "smoke":
        warnings.append("this model comes from a smoke-profile run (tiny images, two epochs: a test of the pipeline), "
                        "so its predictions mean nothing clinically.")
    if config.weights is not None and not config.weights.hash_checked:
        warnings.append(f"the ImageNet weights this model started from ({config.weights.file_name}) were not checked "
                        "against a published hash (their file name carries none), so their origin is unverified.")
    return warnings


def decide(meta: ModelPackageMeta, probability: float) -> str:
    """The class the operating threshold implies."""
    return meta.positive_label if probability >= meta.operating_point.threshold else meta.classes[0]


def aggregate_patients(meta: ModelPackageMeta, rows: list[ImagePrediction]) -> list[PatientPrediction]:
    """One row per patient: mean (or max, as the package says) of its slice probabilities, then the threshold."""
    by_patient: dict[str, list[ImagePrediction]] = defaultdict(list)
    for row in rows:
        by_patient[row.patient_key].append(row)
    reduce = np.max if meta.operating_point.aggregation == "max" else np.mean
    patients = []
    for key in sorted(by_patient):
        group = by_patient[key]
        prob = float(reduce([r.prob_positive for r in group]))
        labels = sorted({r.label for r in group if r.label})
        ids = sorted({r.patient_id for r in group if r.patient_id})
        patients.append(
            PatientPrediction(
                patient_id=" / ".join(ids),
                patient_key=key,
                n_images=len(group),
                label=labels[0] if len(labels) == 1 else "",
                prob_positive=prob,
                aggregation=meta.operating_point.aggregation,
                threshold=meta.operating_point.threshold,
                decision=decide(meta, prob),
            )
        )
    return patients


def predict_dataset(
    package_path: Path,
    dataset_dir: Path,
    out_dir: Path,
    *,
    batch_size: int = 32,
    precision: str = "auto",
    threads: int | None = None,
    dicom_dir: Path | None = None,
) -> PredictSummary:
    """Predict every image of an ingested dataset folder; write predictions, patient predictions and predict.json
    into out_dir (owner-only). dicom_dir: the folder the dataset was ingested from, whose headers give each row's
    PatientID and UIDs (the source paths come from the dataset's private index either way)."""
    started = time.perf_counter()
    package = load_package(package_path)
    dataset = load_dataset(dataset_dir, in_memory=True)
    check_ingested(package.meta, dataset.card)
    model = prepare_model(package, precision, threads)
    probs = predict_images(model, dataset.images, batch_size)
    meta = package.meta
    sources = source_images(dataset_dir, dicom_dir)
    rows = [
        ImagePrediction(
            **vars(sources.get(row.image_key, SourceImage(source_path=""))), image_key=row.image_key,
            patient_key=row.patient_key, frame=row.frame, label=row.label, prob_positive=float(p),
            threshold=meta.operating_point.threshold, decision=decide(meta, float(p)),
        )
        for row, p in zip(dataset.manifest, probs)
    ]
    patients = aggregate_patients(meta, rows)
    out_dir.mkdir(mode=IDENTIFIER_DIR_MODE, parents=True, exist_ok=True)
    out_dir.chmod(IDENTIFIER_DIR_MODE)
    write_models_csv(out_dir / PREDICTIONS_FILE, rows, ImagePrediction, mode=IDENTIFIER_FILE_MODE)
    write_models_csv(out_dir / PATIENT_PREDICTIONS_FILE, patients, PatientPrediction, mode=IDENTIFIER_FILE_MODE)
    card = dataset.card
    summary = PredictSummary(
        package_sha256=package.sha256, arm=meta.arm, weights_variant=meta.weights_variant,
        n_files_seen=card.n_files_seen, n_files_quarantined=card.n_files_quarantined,
        quarantine_reasons=card.quarantine_reasons, n_images=len(rows), n_patients=len(patients),
        n_positive_patients=sum(p.decision == meta.positive_label for p in patients),
        threshold=meta.operating_point.threshold, aggregation=meta.operating_point.aggregation,
        precision=model.precision, threads=model.runtime.num_threads, batch_size=batch_size,
        seconds=time.perf_counter() - started, identifier_files=[PREDICTIONS_FILE, PATIENT_PREDICTIONS_FILE],
        warnings=package_warnings(meta),
    )
    write_model_json(out_dir / PREDICT_SUMMARY_FILE, summary)
    return summary


@task(name="predict-dataset", cache_policy=NO_CACHE)
def predict_dataset_task(package_path: Path, dataset_dir: Path, out_dir: Path, batch_size: int = 32,
                         precision: str = "auto", threads: int | None = None,
                         dicom_dir: Path | None = None) -> PredictSummary:
    """Prefect task around predict_dataset."""
    return predict_dataset(package_path, dataset_dir, out_dir, batch_size=batch_size, precision=precision,
                           threads=threads, dicom_dir=dicom_dir)
