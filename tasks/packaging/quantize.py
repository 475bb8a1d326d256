"""One compressed variant of a package: post-training static int8 quantization with PyTorch's own tooling.

Method: PyTorch eager-mode static quantization (torch.ao.quantization) on torchvision's quantizable twin of the arm's
model (torchvision.models.quantization: ResNet-50, ResNet-18 or MobileNetV3-Large with residual adds and
squeeze-excitation products through FloatFunctional, QuantStub/DeQuantStub; the same state-dict keys as the float
model, built by tasks.packaging.package.float_architecture): conv+bn(+relu)
fused, the "x86" backend's default per-channel symmetric int8 weights and uint8 activations with reduce_range whose
ranges are the minimum and maximum observed over the calibration images (MinMaxObserver: one pass, no histogram
search; the paired comparison with the full model on the test patients reports what this costs), calibrated on
training images only (the run's own training part of its split), then converted.
Eager mode runs on the fbgemm/x86 int8 kernels without torch.compile, which matters on a CPU-only machine; the
PT2E X86InductorQuantizer path needs inductor compilation to be fast. Where no x86/fbgemm engine exists (e.g. an ARM
build with qnnpack only) the variant falls back to bf16 weights (half the size; computed in fp32/bf16) and says so.

The int8 state dict holds quantized tensors only (plus their scales), so the package still loads with
torch.load(weights_only=True); int8_model() rebuilds the quantized module around it.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.ao.quantization as tq
from torch import nn

from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard
from data_schemas.files import read_model_json
from data_schemas.package import PACKAGE_FILE, CompressionComparison, DeploymentCost, ModelPackageMeta
from data_schemas.plan import SplitSettings
from tasks.common.reuse import inputs_key, recorded_package_inputs
from tasks.evaluation.pooling import aggregate_by_patient
from tasks.evaluation.statistics import resampled_roc_auc, roc_auc
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.package import (
    LoadedPackage,
    PackageError,
    float_architecture,
    meta_architecture,
    tensors_sha256,
    write_package_folder,
)
from tasks.splits import parts_for_fold, read_splits, subsample_patients
from tasks.training.augment import images_to_tensor

INT8_ENGINES = ("x86", "fbgemm")
DEFAULT_CALIBRATION_IMAGES = 256


# What torch.ao.quantization warns about on every call: its own deprecation, its observers' and quantized tensors'
# old APIs, and (int8_model's skeleton) observers that saw no values, whose ranges the package's state replaces;
# one note in the module doc suffices.
QUANTIZATION_WARNINGS = (r"torch\.ao\.quantization is deprecated", r"Please use quant_min and quant_max",
                         r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                         r"must run observer before calling calculate_qparams")


def _silence_quantization_warnings() -> None:
    """Ignore QUANTIZATION_WARNINGS from now on: narrow filters, each added once (warnings.catch_warnings is not
    thread-safe, and the shipping stage's writing thread may be saving files, with warnings of their own, meanwhile)."""
    for message in QUANTIZATION_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def int8_engine() -> str | None:
    """The int8 backend this torch build offers for x86 CPUs, or None (then: bf16 fallback)."""
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in INT8_ENGINES if engine in supported), None)


def _qconfig(engine: str) -> tq.QConfig:
    """The engine's default per-channel weight observer with min/max activation observers (module doc)."""
    default = tq.get_default_qconfig(engine)
    return tq.QConfig(activation=tq.MinMaxObserver.with_args(reduce_range=True), weight=default.weight)


def _prepared(meta: ModelPackageMeta, engine: str, float_state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """Fused and observed (not yet converted) model: with the float weights for calibration (built on the meta
    device and given them: no random initialisation to throw away), or (float_state None) a skeleton for
    int8_model, whose scales and zero points are then loaded from a package."""
    if float_state is None:
        model = float_architecture(meta, quantizable=True).eval()
    else:
        model = meta_architecture(meta, quantizable=True).eval()
        model.load_state_dict({k: v.float() for k, v in float_state.items()}, assign=True)
    torch.backends.quantized.engine = engine
    _silence_quantization_warnings()
    model.fuse_model(is_qat=False)
    model.qconfig = _qconfig(engine)
    tq.prepare(model, inplace=True)
    return model


def int8_model(meta: ModelPackageMeta, state: Mapping[str, Any]) -> nn.Module:
    """Rebuild the converted int8 module of a package and load its quantized state."""
    engine = int8_engine()
    if engine is None:
        raise PackageError("this torch build has no x86/fbgemm int8 engine; use the full-precision package.")
    model = _prepared(meta, engine, None)
    model(torch.zeros(1, 1, meta.recipe.train_image_size, meta.recipe.train_image_size))  # observers need a pass
    tq.convert(model, inplace=True)
    # Quantized modules read their state by format version, kept in a state dict's _metadata, which a plain
    # dict in the package does not carry: the freshly converted skeleton has the same versions.
    loaded = OrderedDict(state)
    loaded._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(loaded)
    return model.eval()


def training_images(dataset_dir: Path, meta: ModelPackageMeta, limit: int = DEFAULT_CALIBRATION_IMAGES) -> np.ndarray:
    """Up to `limit` images of the run's training part (never validation or test), evenly spaced, in split order."""
    config = meta.run_config
    card = read_model_json(Path(dataset_dir) / DATASET_CARD_FILE, DatasetCard)
    if card.content_hash != config.dataset_hash:
        raise PackageError("calibration needs the dataset the model was trained on; this one has another content hash.")
    rows, info = read_splits(Path(config.splits_path))
    settings = SplitSettings(seed=info.seed, mode=info.mode, outer_folds=info.folds, val_fraction=info.val_fraction,
                             test_fraction=info.test_fraction)
    # the run's own training patients: its outer fold's train part, subsampled as the run was (fraction runs)
    train = subsample_patients(
        parts_for_fold(rows, config.fold, settings)["train"], config.train.train_fraction, config.seed
    )
    dataset = load_dataset(Path(dataset_dir), in_memory=False)
    index_of = {row.image_key: row.index for row in dataset.manifest}
    picks = np.linspace(0, len(train) - 1, num=min(limit, len(train))).round().astype(int)
    indices = sorted({index_of[train[i].image_key] for i in picks})
    return np.asarray(dataset.images[indices])


@torch.inference_mode()
def _calibrate(model: nn.Module, meta: ModelPackageMeta, images: np.ndarray, batch_size: int) -> None:
    """Run the observed model over the calibration images, preprocessed exactly as for prediction."""
    recipe = meta.recipe
    x = images_to_tensor(images, recipe.train_image_size)
    for start in range(0, x.shape[0], batch_size):
        model((x[start : start + batch_size] - recipe.normalisation_mean) / recipe.normalisation_std)


def quantize_state(
    package: LoadedPackage, calibration: np.ndarray, batch_size: int = 32
) -> tuple[ModelPackageMeta, dict[str, Any], nn.Module | None]:
    """The compressed variant's metadata and state: int8 when an engine exists, else bf16 weights; with the converted
    int8 module (None for bf16), which int8_model rebuilds from the state."""
    meta = package.meta
    if meta.weights_variant != "fp32":
        raise PackageError(f"the package is already {meta.weights_variant}; compress the full-precision one.")
    engine = int8_engine()
    if engine is None:
        state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in package.state_dict.items()}
        note = "bf16 weights: this torch build has no x86/fbgemm int8 engine, so int8 quantization is unsupported"
        variant, model = "bf16", None
    else:
        model = _prepared(meta, engine, package.state_dict)
        _calibrate(model, meta, calibration, batch_size)
        tq.convert(model, inplace=True)
        state = dict(model.state_dict())
        note = (f"post-training static int8 ({engine} engine, eager mode, per-channel weights, min/max activation "
                f"ranges), calibrated on {calibration.shape[0]} training images")
        variant = "int8"
    new_meta = meta.model_copy(update={"weights_variant": variant, "compression": note,
                                       "weights_sha256": tensors_sha256(state)})
    return new_meta, state, model.eval() if model is not None else None


def compression_key(package: LoadedPackage, calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> str:
    """The inputs key of a compressed package (tasks.common.reuse): the full package's model.pt, the number of
    calibration images, the engine and the dataset."""
    return inputs_key({"package": package.sha256, "calibration_images": calibration_images, "engine": int8_engine(),
                       "dataset": package.meta.run_config.dataset_hash})


def compress_package(package: LoadedPackage, dataset_dir: Path, out_dir: Path, *,
                     calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> tuple[LoadedPackage, nn.Module | None]:
    """Quantize a full-precision package on its training images and write it into out_dir as a package of its own;
    returns it with the converted int8 module (None for a bf16 variant), ready to run without rebuilding it."""
    calibration = training_images(dataset_dir, package.meta, calibration_images)
    meta, state, module = quantize_state(package, calibration)
    key = compression_key(package, calibration_images)
    return write_package_folder(Path(out_dir), meta.model_copy(update={"inputs_sha256": key}), state), module


def write_compressed_package(package: LoadedPackage, dataset_dir: Path, out_dir: Path, *,
                             calibration_images: int = DEFAULT_CALIBRATION_IMAGES, reuse: bool = True) -> Path:
    """compress_package, unless an intact package in out_dir was made from the same package, images and engine
    (reuse, tasks.common.reuse); returns the path of its model.pt."""
    out_dir = Path(out_dir)
    if reuse and recorded_package_inputs(out_dir / PACKAGE_FILE) == compression_key(package, calibration_images):
        return out_dir / PACKAGE_FILE
    return compress_package(package, dataset_dir, out_dir, calibration_images=calibration_images)[0].path


@dataclass(frozen=True)
class PairedPredictions:
    """Both models' positive-class probabilities on the same test images, with each image's target and patient."""

    targets: np.ndarray
    patients: list[str]
    full: np.ndarray
    compressed: np.ndarray


def paired_auc_change(pred: PairedPredictions, *, aggregation: str, n_bootstrap: int,
                      seed: int) -> tuple[float, float, tuple[float, float] | None, int]:
    """Patient-level AUC of both models, and the 95% percentile bootstrap interval of AUC(compressed) - AUC(full).

    Slice probabilities are aggregated per patient as the report aggregates them; each resample draws patients with
    replacement and scores both models on the same drawn patients (a paired interval). Resamples with one class are
    skipped. Returns (auc_full, auc_compressed, interval or None when not estimable, patients).
    """
    full = aggregate_by_patient(pred.patients, pred.targets, pred.full, aggregation)  # type: ignore[arg-type]
    small = aggregate_by_patient(pred.patients, pred.targets, pred.compressed, aggregation)  # type: ignore[arg-type]
    y, a, b = full.targets, full.probs, small.probs
    n = y.size
    if min(int(y.sum()), int(n - y.sum())) < 2:
        return roc_auc(y, a), roc_auc(y, b), None, n
    draws = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    changes = resampled_roc_auc(y, b, draws) - resampled_roc_auc(y, a, draws)  # NaN where a resample has one class
    low, high = np.percentile(changes[~np.isnan(changes)], [2.5, 97.5])
    return roc_auc(y, a), roc_auc(y, b), (float(low), float(high)), n


def _judgement(interval: tuple[float, float] | None, tolerance: float) -> str:
    """Within the tolerance, beyond it, or undecided, by where the interval of the change lies against -tolerance."""
    if interval is None:
        return "not_estimable"
    if interval[0] > -tolerance:
        return "within"
    return "beyond" if interval[1] < -tolerance else "undecided"


JUDGEMENT_WORDS = {
    "within": "the loss is within the tolerance of {tol} AUC (the interval's lower bound lies above −{tol})",
    "beyond": "the loss exceeds the tolerance of {tol} AUC (the whole interval lies below −{tol})",
    "undecided": "the loss is not shown within the tolerance of {tol} AUC (the interval reaches below −{tol})",
}


def compare_compression(full: DeploymentCost, compressed: DeploymentCost, pred: PairedPredictions, *,
                        tolerance: float, aggregation: str = "mean", n_bootstrap: int = 1000, seed: int = 0,
                        reference: str = "the full-precision predictions") -> CompressionComparison:
    """Size, latency and the paired patient-level change in test AUC, judged against `tolerance` (see _judgement)."""
    auc_full, auc_small, interval, n_patients = paired_auc_change(
        pred, aggregation=aggregation, n_bootstrap=n_bootstrap, seed=seed)
    finite = math.isfinite(auc_full) and math.isfinite(auc_small)
    change = auc_small - auc_full if finite else None
    judgement = _judgement(interval if finite else None, tolerance)
    size_ratio = compressed.package_bytes / full.package_bytes
    speed = full.latency_ms_median / compressed.latency_ms_median
    head = (f"The {compressed.weights_variant} variant is {size_ratio:.0%} of the full-precision size and "
            f"{speed:.2f}x as fast at batch 1")
    if change is None:
        statement = (f"{head}; its patient-level test AUC is not estimable on {n_patients} test patients "
                     "(one class only).")
    else:
        where = (f"patient-level test AUC on the packaged run's {n_patients} test patients {auc_small:.3f} against "
                 f"{auc_full:.3f} as in {reference}, change {change:+.3f}")
        if interval is None:
            statement = f"{head}; {where}; no interval: fewer than 2 patients of a class."
        else:
            words = JUDGEMENT_WORDS[judgement].format(tol=f"{tolerance:g}")
            statement = (f"{head}; {where} (95% CI {interval[0]:+.3f} to {interval[1]:+.3f}, paired bootstrap over "
                         f"patients): {words}.")
    return CompressionComparison(
        full=full, compressed=compressed, level="patient", reference=reference, n_patients=n_patients,
        auc_full=auc_full if finite else None, auc_compressed=auc_small if finite else None, auc_change=change,
        interval=interval, tolerance=tolerance, judgement=judgement, statement=statement,  # type: ignore[arg-type]
    )
