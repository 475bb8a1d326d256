"""A completed run folder -> a self-contained model package (see data_schemas/package.py for the files), and back.

model.pt holds plain tensors and JSON-able metadata only, so `torch.load(path, weights_only=True)` reads it: no
pickled class of this project is needed to open it, and opening it cannot run code. The preprocessing recipe is
read from the training dataset's dataset.json and the run's config.json when the package is written; after that
neither the dataset nor the run folder is needed.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard
from data_schemas.files import atomic_write_bytes, atomic_write_text, read_model_json, sha256_file
from data_schemas.metrics import MetricValue
from data_schemas.report import METRIC_NAMES, ArmResult, TestMetrics
from data_schemas.package import (
    CHECKSUMS_FILE,
    DeploymentCost,
    MODEL_CARD_FILE,
    PACKAGE_DIR,
    PACKAGE_FILE,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    ModelPackageMeta,
    OperatingPoint,
    PackageMetrics,
    PreprocessRecipe,
    TrainingDataSummary,
)
from data_schemas.training import (
    BEST_FILE,
    CONFIG_FILE,
    GRAY_MEAN,
    GRAY_STD,
    LINEAR_MODEL_FILE,
    STATUS_FILE,
    LinearProbeModel,
    RunConfig,
    RunSummary,
)
from data_schemas.arms import RESIZE_METHOD
from tasks.ingest.decode import PREPROCESS_VERSION
from tasks.training.models import build_resnet50, feature_extractor, pooled_at_depth
from tasks.training.weights import resolve_imagenet_weights

# How tasks.training.augment.images_to_tensor brings the ingested images to the training size (once, in memory).
TRAIN_RESIZE_METHOD = RESIZE_METHOD + ", ingest size -> training size (tasks.training.augment.images_to_tensor)"
MONOCHROME1_HANDLING = "inverted at ingest (stored as 1 - v), so that bright means dense for every image"
AGGREGATION_CHOICES = ("mean", "max")


class PackageError(ValueError):
    """A run folder that cannot be packaged, or a file that is not a usable package: one sentence."""


@dataclass
class LoadedPackage:
    """A package read back: its metadata, its tensors, and where it came from.

    Args:
        meta: the validated metadata.
        state_dict: the tensors (float, bf16 or quantized).
        path: the model.pt file.
        sha256: SHA-256 of model.pt.
    """

    meta: ModelPackageMeta
    state_dict: dict[str, Any]
    path: Path
    sha256: str


# ----------------------------------------------------------------------------------------------------- writing


def tensors_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 over key names and tensor bytes in key order (quantized tensors by their int representation)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode("utf-8"))
        for tensor in _tensors_in(state[key]):
            if tensor.is_quantized:
                tensor = tensor.int_repr()
            digest.update(str(tuple(tensor.shape)).encode("ascii"))
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a state-dict value (quantized linear layers keep a (weight, bias) tuple)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors_in(item)]
    return []


def read_recipe(card: DatasetCard, config: RunConfig) -> PreprocessRecipe:
    """The preprocessing recipe from the dataset card (window, ingest size, conversion) and the run config (size)."""
    if card.content_hash != config.dataset_hash:
        raise PackageError(
            f"the dataset given (content hash {card.content_hash[:12]}) is not the one the run was trained on "
            f"({config.dataset_hash[:12]}); pass the run's own dataset folder."
        )
    return PreprocessRecipe(
        window=card.window, ingest_image_size=card.image_size, train_image_size=config.train.image_size,
        value_mapping=card.value_mapping, monochrome1=MONOCHROME1_HANDLING, interpolation=card.interpolation,
        padding=card.padding, resize_method=TRAIN_RESIZE_METHOD, normalisation_mean=GRAY_MEAN,
        normalisation_std=GRAY_STD, preprocess_version=PREPROCESS_VERSION,
    )


def training_data_summary(card: DatasetCard) -> TrainingDataSummary:
    """Counts and fingerprint of the training dataset (shareable: no identifiers)."""
    return TrainingDataSummary(
        content_hash=card.content_hash, n_images=card.n_images, n_patients=card.n_patients,
        label_distribution=card.label_distribution, n_files_quarantined=card.n_files_quarantined,
        fingerprint=card.fingerprint,
    )


def _completed_config(run_dir: Path) -> RunConfig:
    """config.json of a run whose status.json says completed; PackageError otherwise."""
    status_path = run_dir / STATUS_FILE
    if not status_path.is_file():
        raise PackageError(f"{run_dir} is not a run folder: {STATUS_FILE} is missing.")
    status = read_model_json(status_path, RunSummary)
    if status.status != "completed":
        raise PackageError(f"run {run_dir} is {status.status}, not completed; only a completed run can be packaged.")
    return read_model_json(run_dir / CONFIG_FILE, RunConfig)


def _network_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The best epoch's weights (best.pt, read weights-only)."""
    best = torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True)
    return {k: v.detach().clone() for k, v in best["state_dict"].items()}


def _linear_probe_state(config: RunConfig, weights_path: Path | None, depth: str | None) -> dict[str, torch.Tensor]:
    """The frozen feature extractor (grey-folded ImageNet backbone, up to the probe's depth) the probe was fitted on,
    checked by hash."""
    if config.weights is None:
        raise PackageError("the linear-probe run records no backbone weights; it cannot be packaged.")
    source = Path(weights_path) if weights_path is not None else Path(config.weights.path)
    if not source.is_file():
        raise PackageError(
            f"the backbone weights the run used ({config.weights.file_name}) are not at {source}; pass weights_path."
        )
    backbone, info = resolve_imagenet_weights(source)
    if info.sha256 != config.weights.sha256:
        raise PackageError(f"{source} is not the backbone the run used (SHA-256 differs from config.json's).")
    return {k: v.detach().clone() for k, v in pooled_at_depth(feature_extractor(backbone), depth).state_dict().items()}


def build_meta(*, run_dir: Path, card: DatasetCard, config: RunConfig, state: Mapping[str, Any],
               operating_point: OperatingPoint, metrics: PackageMetrics | None) -> ModelPackageMeta:
    """The package metadata for one run folder."""
    linear = config.arm == "imagenet-linear"
    sources = {name: sha256_file(run_dir / name) for name in (CONFIG_FILE, STATUS_FILE) if (run_dir / name).is_file()}
    sources[LINEAR_MODEL_FILE if linear else BEST_FILE] = sha256_file(run_dir / (LINEAR_MODEL_FILE if linear else BEST_FILE))
    sources[DATASET_CARD_FILE] = card.content_hash
    return ModelPackageMeta(
        kind="linear-probe" if linear else "network", arm=config.arm, classes=config.classes,
        positive_label=config.positive_label, recipe=read_recipe(card, config), operating_point=operating_point,
        run_config=config, training_data=training_data_summary(card), metrics=metrics,
        linear_probe=read_model_json(run_dir / LINEAR_MODEL_FILE, LinearProbeModel) if linear else None,
        source_files=sources, weights_sha256=tensors_sha256(state),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch_version=torch.__version__,
    )


def save_package_file(path: Path, meta: ModelPackageMeta, state: Mapping[str, Any]) -> Path:
    """Write model.pt atomically: format marker, JSON-able metadata, tensors."""
    buffer = io.BytesIO()
    torch.save({
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        "metadata": meta.model_dump(mode="json"), "state_dict": dict(state),
    }, buffer)
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def write_card(out_dir: Path, meta: ModelPackageMeta, cost: DeploymentCost | None = None) -> Path:
    """(Re)write MODEL_CARD.md beside model.pt, then SHA256SUMS over both; returns the card's path."""
    from reports.model_card import render_model_card

    card = out_dir / MODEL_CARD_FILE
    atomic_write_text(card, render_model_card(meta, package_bytes=(out_dir / PACKAGE_FILE).stat().st_size, cost=cost))
    sums = "".join(f"{sha256_file(out_dir / name)}  {name}\n" for name in (PACKAGE_FILE, MODEL_CARD_FILE))
    atomic_write_text(out_dir / CHECKSUMS_FILE, sums)
    return card


def write_package_folder(out_dir: Path, meta: ModelPackageMeta, state: Mapping[str, Any]) -> Path:
    """model.pt, MODEL_CARD.md and SHA256SUMS in out_dir; returns the model.pt path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = save_package_file(out_dir / PACKAGE_FILE, meta, state)
    write_card(out_dir, meta)
    return model_path


def write_package(
    *,
    run_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    threshold: float,
    threshold_rule: str,
    aggregation: str,
    metrics: dict[str, Any] | None,
    weights_path: Path | None = None,
) -> Path:
    """Package one completed run (network or linear probe) into out_dir; returns the path of model.pt.

    threshold/threshold_rule: the operating point chosen on validation predictions; aggregation: "mean" or "max";
    metrics: the test metrics with intervals in PackageMetrics form; weights_path: the ImageNet backbone file of a
    linear-probe run when it is no longer where config.json says.
    """
    if aggregation not in AGGREGATION_CHOICES:
        raise ValueError(f"aggregation {aggregation!r} is not valid; choose one of {', '.join(AGGREGATION_CHOICES)}.")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}.")
    run_dir, dataset_dir, out_dir = Path(run_dir), Path(dataset_dir), Path(out_dir)
    config = _completed_config(run_dir)
    card = read_model_json(dataset_dir / DATASET_CARD_FILE, DatasetCard)
    checked_metrics = PackageMetrics.model_validate(metrics) if metrics is not None else None
    if config.arm == "imagenet-linear":
        state = _linear_probe_state(config, weights_path, read_model_json(run_dir / LINEAR_MODEL_FILE, LinearProbeModel).depth)
    else:
        state = _network_state(run_dir)
    operating_point = OperatingPoint(threshold=threshold, rule=threshold_rule, aggregation=aggregation)  # type: ignore[arg-type]
    meta = build_meta(run_dir=run_dir, card=card, config=config, state=state, operating_point=operating_point,
                      metrics=checked_metrics)
    return write_package_folder(out_dir, meta, state)


def package_metrics(arm: ArmResult, mode: str) -> PackageMetrics | None:
    """The arm's test metrics with intervals, as the comparison reported them, in the package's shape."""
    if arm.test_metrics is None:
        return None
    level = arm.patient_metrics or arm.test_metrics

    def named(metrics: TestMetrics | None) -> dict[str, MetricValue]:
        return {name: getattr(metrics, name) for name in METRIC_NAMES} if metrics is not None else {}

    return PackageMetrics(mode=mode, patient=named(arm.patient_metrics), slice=named(arm.test_metrics),  # type: ignore[arg-type]
                          n_test_patients=level.n_patients, n_test_images=arm.test_metrics.n_images)


# ----------------------------------------------------------------------------------------------------- reading


def package_file(path: Path) -> Path:
    """model.pt from a package file, a package folder, or a run folder holding package/; PackageError otherwise."""
    path = Path(path)
    for candidate in (path, path / PACKAGE_FILE, path / PACKAGE_DIR / PACKAGE_FILE):
        if candidate.is_file():
            return candidate
    if (path / CONFIG_FILE).is_file():
        raise PackageError(
            f"run folder {path} holds no model package ({PACKAGE_DIR}/{PACKAGE_FILE}); package it first "
            "(tasks.packaging.package.write_package), since a run folder alone does not record its preprocessing window."
        )
    raise PackageError(f"{path} is neither a model package ({PACKAGE_FILE}) nor a run folder holding one.")


def _verify_checksums(model_path: Path, digest: str) -> None:
    """Compare model.pt with SHA256SUMS beside it, when there is one (a bare model.pt has none)."""
    sums = model_path.parent / CHECKSUMS_FILE
    if not sums.is_file():
        return
    recorded = dict(reversed(line.split("  ", 1)) for line in sums.read_text().splitlines() if "  " in line)
    expected = recorded.get(model_path.name)
    if expected is not None and expected != digest:
        raise PackageError(f"{model_path} does not match its {CHECKSUMS_FILE} (changed or corrupt since packaging).")


def load_package(path: Path) -> LoadedPackage:
    """Read a package with torch.load(weights_only=True), check format, checksums and weights hash."""
    model_path = package_file(path)
    digest = sha256_file(model_path)
    _verify_checksums(model_path, digest)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means it is not a package
        raise PackageError(f"{model_path} is not a readable model package ({type(error).__name__}).") from None
    if not isinstance(raw, dict) or raw.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{model_path} is not a ctcompare model package (no '{PACKAGE_FORMAT}' marker).")
    if raw.get("format_version") != PACKAGE_FORMAT_VERSION:
        raise PackageError(
            f"{model_path} has package format {raw.get('format_version')}; this ctcompare reads format "
            f"{PACKAGE_FORMAT_VERSION}."
        )
    meta = ModelPackageMeta.model_validate(raw["metadata"])
    state = raw["state_dict"]
    if tensors_sha256(state) != meta.weights_sha256:
        raise PackageError(f"{model_path}: the weights do not match the hash recorded in the package.")
    return LoadedPackage(meta=meta, state_dict=state, path=model_path, sha256=digest)


def float_architecture(meta: ModelPackageMeta) -> nn.Module:
    """The float ResNet-50 of a package, untrained: classifier (dropout + linear) or feature extractor (fc Identity)."""
    model = build_resnet50(1, len(meta.classes), meta.run_config.train.dropout, None)
    if meta.kind == "linear-probe":
        model.fc = nn.Identity()
        model = pooled_at_depth(model, meta.linear_probe.depth if meta.linear_probe else None)
    return model


def float_model(meta: ModelPackageMeta, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The float model with the package's weights (bf16 weights are brought back to fp32), in eval mode."""
    model = float_architecture(meta)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
