"""A completed run folder -> a self-contained model package (see data_schemas/package.py for the files), and back.

model.pt holds plain tensors and JSON-able metadata only, so `torch.load(path, weights_only=True)` reads it: no
pickled class of this project is needed to open it, and opening it cannot run code. The preprocessing recipe is
read from the training dataset's dataset.json and the run's config.json when the package is written; after that
neither the dataset nor the run folder is needed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from data_schemas.arms import RESIZE_METHOD, parse_arm
from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard
from data_schemas.files import atomic_write_bytes, atomic_write_text, read_model_json, sha256_json
from data_schemas.metrics import MetricValue
from data_schemas.package import (
    CHECKSUMS_FILE,
    MODEL_CARD_FILE,
    PACKAGE_DIR,
    PACKAGE_FILE,
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    DeploymentCost,
    ModelPackageMeta,
    OperatingPoint,
    PackageMetrics,
    PreprocessRecipe,
    TrainingDataSummary,
)
from data_schemas.report import METRIC_NAMES, ArmResult, TestMetrics
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
from tasks.common.reuse import file_sha256, inputs_key, recorded_package_inputs, remember_file_sha256
from tasks.ingest.decode import PREPROCESS_VERSION
from tasks.training.models import as_feature_extractor, build_model, pooled_at_depth
from tasks.training.weights import check_state_dict, fold_gray_normalisation
from tasks.training.weights_record import recorded_check

if TYPE_CHECKING:
    from tasks.packaging.background import BackgroundWrites

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
        file_bytes: the size of model.pt when this process has just written it (the file may still be being written
            in the background: tasks.packaging.background); None for a package read back.
    """

    meta: ModelPackageMeta
    state_dict: dict[str, Any]
    path: Path
    sha256: str
    file_bytes: int | None = None

    def size(self) -> int:
        """model.pt's size in bytes."""
        return self.file_bytes if self.file_bytes is not None else self.path.stat().st_size

    @cached_property
    def float_network(self) -> nn.Module:
        """float_model of this float package, built once: the model its measurement times is the one its MONAI
        bundle traces (its parameters are the package's own fp32 tensors; treat it as read-only)."""
        return float_model(self.meta, self.state_dict)


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
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
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
    """The best epoch's weights (best.pt, read weights-only and memory-mapped: private pages read as they are used,
    not copied; best.pt is only ever replaced whole, never rewritten in place)."""
    return dict(torch.load(run_dir / BEST_FILE, map_location="cpu", weights_only=True, mmap=True)["state_dict"])


def _backbone_file(config: RunConfig, weights_path: Path | None) -> tuple[Path, bool]:
    """The weights file the run used: where config.json says, else weights_path, each accepted only with the SHA-256
    config.json records (so a ResNet-50 --weights file is never taken for another model's backbone). Returns it and
    whether its full check is recorded for the file as it is now (tasks.training.weights_record): then its SHA-256
    is the record's, not hashed again."""
    assert config.weights is not None
    model = parse_arm(config.arm).model
    candidates = [Path(config.weights.path)] + ([Path(weights_path)] if weights_path is not None else [])
    for candidate in candidates:
        if not candidate.is_file():
            continue
        recorded = recorded_check(candidate, model)
        if (recorded.sha256 if recorded is not None else file_sha256(candidate)) == config.weights.sha256:
            return candidate, recorded is not None
    where = " or ".join(str(c) for c in candidates)
    raise PackageError(
        f"the backbone weights the run used ({config.weights.file_name}, SHA-256 {config.weights.sha256[:12]}) are not "
        f"at {where}; pass weights_path."
    )


def _read_weights_file(path: Path) -> Any:
    """A weights file read weights-only, memory-mapped where its format allows (a legacy, non-zip file cannot be):
    only the tensors used are then read from disk."""
    with warnings.catch_warnings():  # torch warns about the pickle protocol of some files; the file was checked
        warnings.simplefilter("ignore", UserWarning)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=True)


def _linear_probe_state(config: RunConfig, weights_path: Path | None, depth: str | None) -> dict[str, torch.Tensor]:
    """The frozen feature extractor (grey-folded ImageNet backbone, up to the probe's depth) the probe was fitted on:
    the backbone file the run used (by its SHA-256), checked and folded as training folds it, keyed as the
    extractor's architecture (built on the meta device: shapes and names only) keys it; only those layers are read
    from the file."""
    if config.weights is None:
        raise PackageError("the linear-probe run records no backbone weights; it cannot be packaged.")
    model = parse_arm(config.arm).model
    path, recorded = _backbone_file(config, weights_path)
    # a file whose full check is recorded unchanged passed the value check: names and shapes are checked again
    backbone = check_state_dict(_read_weights_file(path), model, source=f"weights file {path}", values=not recorded)
    with torch.device("meta"):
        wanted = pooled_at_depth(as_feature_extractor(build_model(model)), depth).state_dict()
    # only the layers up to the probe's depth are folded (copied) and packaged
    folded = fold_gray_normalisation({key: value for key, value in backbone.items() if key in wanted}, model)
    # a file without BatchNorm's num_batches_tracked leaves the built model's own (zero) counters
    return {key: folded[key] if key in folded else torch.zeros(value.shape, dtype=value.dtype)
            for key, value in wanted.items()}


def _hashed_state(run_dir: Path, config: RunConfig, weights_path: Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors a run's package holds (a network's best epoch, or a linear probe's feature extractor) and their
    tensors_sha256."""
    if parse_arm(config.arm).mode == "imagenet-linear":
        depth = read_model_json(run_dir / LINEAR_MODEL_FILE, LinearProbeModel).depth
        state = _linear_probe_state(config, weights_path, depth)
    else:
        state = _network_state(run_dir)
    return state, tensors_sha256(state)


def source_files(run_dir: Path, card: DatasetCard, config: RunConfig) -> dict[str, str]:
    """Run/dataset file name -> SHA-256 of the files a package is built from (the dataset by its content hash)."""
    weights = LINEAR_MODEL_FILE if parse_arm(config.arm).mode == "imagenet-linear" else BEST_FILE
    sources = {name: file_sha256(run_dir / name) for name in (CONFIG_FILE, STATUS_FILE) if (run_dir / name).is_file()}
    sources[weights] = file_sha256(run_dir / weights)
    sources[DATASET_CARD_FILE] = card.content_hash
    return sources


def build_meta(*, run_dir: Path, card: DatasetCard, config: RunConfig, weights_sha256: str,
               operating_point: OperatingPoint, metrics: PackageMetrics | None, sources: dict[str, str],
               inputs_sha256: str) -> ModelPackageMeta:
    """The package metadata for one run folder: weights_sha256 is tensors_sha256 of the tensors it holds, sources
    is source_files, inputs_sha256 the package's inputs key."""
    linear = parse_arm(config.arm).mode == "imagenet-linear"
    return ModelPackageMeta(
        kind="linear-probe" if linear else "network", arm=config.arm, classes=config.classes,
        positive_label=config.positive_label, recipe=read_recipe(card, config), operating_point=operating_point,
        run_config=config, training_data=training_data_summary(card), metrics=metrics,
        linear_probe=read_model_json(run_dir / LINEAR_MODEL_FILE, LinearProbeModel) if linear else None,
        source_files=sources, weights_sha256=weights_sha256, inputs_sha256=inputs_sha256,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch_version=torch.__version__,
    )


def save_package_file(path: Path, meta: ModelPackageMeta, state: Mapping[str, Any],
                      writes: BackgroundWrites | None = None) -> tuple[str, int]:
    """Write model.pt atomically (format marker, JSON-able metadata, tensors); returns its SHA-256, taken from the
    bytes as they are written (the file is not read back to hash it), and its size. writes: write the file in the
    background (tasks.packaging.background) once its bytes are made."""
    buffer = io.BytesIO()
    torch.save({
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_FORMAT_VERSION,
        "metadata": meta.model_dump(mode="json"), "state_dict": dict(state),
    }, buffer)
    digest = hashlib.sha256(buffer.getbuffer()).hexdigest()

    def write() -> None:
        atomic_write_bytes(path, buffer.getbuffer())
        remember_file_sha256(path, digest)

    if writes is not None:
        writes.submit(write)
    else:
        write()
    return digest, buffer.getbuffer().nbytes


def write_card(package: LoadedPackage, cost: DeploymentCost | None = None) -> Path:
    """(Re)write MODEL_CARD.md beside the package's model.pt, then SHA256SUMS over both; returns the card's path."""
    from reports.model_card import render_model_card

    out_dir = package.path.parent
    card = out_dir / MODEL_CARD_FILE
    text = render_model_card(package.meta, package_bytes=package.size(), cost=cost)
    atomic_write_text(card, text)
    card_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    remember_file_sha256(card, card_digest)
    atomic_write_text(out_dir / CHECKSUMS_FILE,
                      f"{package.sha256}  {PACKAGE_FILE}\n{card_digest}  {MODEL_CARD_FILE}\n")
    return card


def write_package_folder(out_dir: Path, meta: ModelPackageMeta, state: Mapping[str, Any],
                         writes: BackgroundWrites | None = None) -> LoadedPackage:
    """model.pt, MODEL_CARD.md and SHA256SUMS in out_dir; returns the package as written (as load_package would
    read it back, without reading it). writes: model.pt is written in the background (the card and sums at once)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest, size = save_package_file(out_dir / PACKAGE_FILE, meta, state, writes)
    package = LoadedPackage(meta=meta, state_dict=dict(state), path=out_dir / PACKAGE_FILE, sha256=digest,
                            file_bytes=size)
    write_card(package)
    return package


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
    reuse: bool = True,
    writes: BackgroundWrites | None = None,
) -> LoadedPackage:
    """Package one completed run (network or linear probe) into out_dir; returns the package (model.pt: its .path).

    threshold/threshold_rule: the operating point chosen on validation predictions; aggregation: "mean" or "max";
    metrics: the test metrics with intervals in PackageMetrics form; weights_path: the ImageNet backbone file of a
    linear-probe run when it is no longer where config.json says. reuse: keep an intact package in out_dir made from
    the same inputs (tasks.common.reuse) instead of writing it again. writes: write model.pt in the background
    (tasks.packaging.background; the returned package's file_bytes then says it was written here).
    """
    if aggregation not in AGGREGATION_CHOICES:
        raise ValueError(f"aggregation {aggregation!r} is not valid; choose one of {', '.join(AGGREGATION_CHOICES)}.")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}.")
    run_dir, dataset_dir, out_dir = Path(run_dir), Path(dataset_dir), Path(out_dir)
    config = _completed_config(run_dir)
    card = read_model_json(dataset_dir / DATASET_CARD_FILE, DatasetCard)
    checked_metrics = PackageMetrics.model_validate(metrics) if metrics is not None else None
    operating_point = OperatingPoint(threshold=threshold, rule=threshold_rule, aggregation=aggregation)  # type: ignore[arg-type]
    # No package there yet, so none can be kept: read and hash the weights while the source files are hashed (both
    # release the GIL, so each gets a core).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="package-weights") as pool:
        weights = None if (out_dir / PACKAGE_FILE).is_file() else pool.submit(_hashed_state, run_dir, config,
                                                                                weights_path)
        sources = source_files(run_dir, card, config)
        key = inputs_key(
            {
                "format": PACKAGE_FORMAT_VERSION,
                "sources": sources,
                "operating_point": operating_point.model_dump(),
                "metrics": checked_metrics.model_dump(mode="json") if checked_metrics is not None else None,
            }
        )
        if reuse and recorded_package_inputs(out_dir / PACKAGE_FILE) == key:
            return load_package(out_dir)
        state, weights_sha256 = weights.result() if weights is not None else _hashed_state(run_dir, config,
                                                                                          weights_path)
    meta = build_meta(run_dir=run_dir, card=card, config=config, weights_sha256=weights_sha256,
                      operating_point=operating_point, metrics=checked_metrics, sources=sources, inputs_sha256=key)
    return write_package_folder(out_dir, meta, state, writes)


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
            "(tasks.packaging.package.write_package), since a run folder alone does not record its preprocessing "
            "window."
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
    digest = file_sha256(model_path)
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


def float_architecture(meta: ModelPackageMeta, quantizable: bool = False) -> nn.Module:
    """The package's network, untrained: the arm's torchvision model (ResNet-50, ResNet-18 or MobileNetV3-Large) as a
    classifier (dropout + linear head) or as the feature extractor a linear probe reads (pooled at its depth).

    quantizable: torchvision's quantizable twin with the same state-dict keys (tasks.packaging.quantize).
    """
    model = build_model(parse_arm(meta.arm).model, num_classes=len(meta.classes),
                        dropout=meta.run_config.train.dropout, quantizable=quantizable)
    if meta.kind == "linear-probe":
        model = pooled_at_depth(as_feature_extractor(model), meta.linear_probe.depth if meta.linear_probe else None)
    return model


_META_ARCHITECTURES: dict[tuple[str, bool], nn.Module] = {}  # (architecture_key, quantizable) -> meta-device build


def meta_architecture(meta: ModelPackageMeta, quantizable: bool = False) -> nn.Module:
    """float_architecture on the meta device (names and shapes, no values), built once per architecture in this
    process and copied for each caller: building runs every layer's initialiser, copying does not."""
    key = (architecture_key(meta), quantizable)
    if key not in _META_ARCHITECTURES:
        with torch.device("meta"):
            _META_ARCHITECTURES[key] = float_architecture(meta, quantizable)
    return copy.deepcopy(_META_ARCHITECTURES[key])


def architecture_key(meta: ModelPackageMeta) -> str:
    """What a package's network and its cost depend on: the model, classes, head, probe depth and trained size."""
    depth = meta.linear_probe.depth if meta.linear_probe is not None else None
    return sha256_json({"model": parse_arm(meta.arm).model, "kind": meta.kind, "classes": len(meta.classes),
                        "depth": depth, "dropout": meta.run_config.train.dropout,
                        "size": meta.recipe.train_image_size})


def float_model(meta: ModelPackageMeta, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The float model with the package's weights (bf16 weights are brought back to fp32), in eval mode.

    Built on the meta device and given the package's tensors (assign): no random initialisation to throw away.
    """
    model = meta_architecture(meta)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise PackageError(f"the package's weights do not cover its {meta.arm} network.")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
