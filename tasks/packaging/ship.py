"""Shipping a compared arm: its package, its deployment cost, its MONAI bundle, and the compressed variant with its
comparison, each skipped when its inputs have not changed (tasks.common.reuse), so a re-run of an unchanged
comparison ships in seconds. Each package is read from disk at most once per shipping: what is written here is
measured, bundled and compared from memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_schemas.files import read_model_json, write_model_json
from data_schemas.package import PACKAGE_DIR, PACKAGE_FILE, CachedCompression, CompressionComparison, DeploymentCost
from data_schemas.training import PREDICTIONS_FILE
from tasks.common.reuse import file_sha256, inputs_key, recorded_package_inputs
from tasks.packaging.background import BackgroundWrites
from tasks.packaging.bundle import BUNDLE_DIR, bundle_network, write_bundle
from tasks.packaging.deploy_cost import evaluate_compression, package_cost
from tasks.packaging.package import LoadedPackage, load_package, write_package
from tasks.packaging.predict import PackagedModel, prepare_model
from tasks.packaging.quantize import compress_package, compression_key

COMPRESSED_PACKAGE_DIR = "package-compressed"  # beside the full package/ in the run folder
COMPRESSION_FILE = "compression.json"  # in the compressed package's folder: CachedCompression


@dataclass
class SameNetworkWork:
    """What the packages shipped in one stage share when their networks are the same (same architecture and size):
    one timing (tasks.packaging.deploy_cost.package_cost) and one TorchScript trace
    (tasks.packaging.bundle.traced_network); each package keeps its own weights, bundle and deploy_cost.json."""

    timings: dict[str, DeploymentCost] = field(default_factory=dict)
    traces: dict[str, torch.jit.ScriptModule] = field(default_factory=dict)


@dataclass(frozen=True)
class ShippedArm:
    """One packaged and costed run: its package folder, its MONAI bundle folder and its deployment cost, with the
    package as this process holds it (for compress_and_compare, without reading it again) and its files' writes
    (written.result() waits for them: they may still be under way)."""

    package_dir: Path
    bundle_dir: Path
    cost: DeploymentCost
    package: LoadedPackage
    written: BackgroundWrites


def ship_run(*, run_dir: Path, dataset_dir: Path, threshold: float, threshold_rule: str, aggregation: str,
             metrics: dict[str, Any] | None, weights_path: Path | None, budget_seconds: float,
             shared: SameNetworkWork | None = None) -> ShippedArm:
    """RUN_DIR/package (write_package), its deployment cost (package_cost) and RUN_DIR/bundle (write_bundle, with
    the costed model card), each kept when unchanged; a package written here is measured and bundled from memory.
    shared: the work of the arms shipped before in the same stage, which a package of the same network reuses.

    The package's and the bundle's files are written in the background (tasks.packaging.background) while the work
    goes on; ShippedArm.written waits for them. A package written here is traced for its bundle before it is timed,
    while its model.pt is being written (the timing itself waits for every write)."""
    run_dir = Path(run_dir)
    writes = BackgroundWrites()
    package = write_package(run_dir=run_dir, dataset_dir=dataset_dir, out_dir=run_dir / PACKAGE_DIR,
                            threshold=threshold, threshold_rule=threshold_rule, aggregation=aggregation,
                            metrics=metrics, weights_path=weights_path, writes=writes)
    traces = shared.traces if shared else None
    network = bundle_network(package, traces) if package.file_bytes is not None else None  # written here: new bundle
    cost = package_cost(package, budget_seconds=budget_seconds, timings=shared.timings if shared else None)
    bundle = write_bundle(package, run_dir / BUNDLE_DIR, traces=traces, network=network, writes=writes)
    return ShippedArm(package_dir=package.path.parent, bundle_dir=bundle, cost=cost, package=package, written=writes)


def compress_and_compare(*, full_package: Path | LoadedPackage, dataset_dir: Path, full_cost: DeploymentCost,
                         budget_seconds: float, tolerance: float, aggregation: str, n_bootstrap: int,
                         seed: int) -> tuple[CompressionComparison, Path]:
    """The compressed variant beside a full package (RUN_DIR/package-compressed) and its comparison with the full
    one on the run's test images; both kept when their inputs are unchanged. Returns (comparison, its folder).

    full_package: the package's path, or the package this process holds (ShippedArm.package: not read again). A
    variant quantized here is measured and compared with the module the quantization converted (not rebuilt)."""
    full = full_package if isinstance(full_package, LoadedPackage) else load_package(Path(full_package))
    run_dir = full.path.parent.parent
    compressed = run_dir / COMPRESSED_PACKAGE_DIR
    fresh: PackagedModel | None = None
    if recorded_package_inputs(compressed / PACKAGE_FILE) != compression_key(full):
        written, module = compress_package(full, dataset_dir, compressed)
        fresh = prepare_model(written, "auto", int8_module=module)
    key = inputs_key({"compressed": file_sha256(compressed / PACKAGE_FILE), "full_cost": full_cost.inputs_sha256,
                      "full": full.sha256, "budget_seconds": budget_seconds,
                      "predictions": file_sha256(run_dir / PREDICTIONS_FILE), "tolerance": tolerance,
                      "aggregation": aggregation, "n_bootstrap": n_bootstrap, "seed": seed})
    cache = compressed / COMPRESSION_FILE
    if cache.is_file():
        try:
            cached = read_model_json(cache, CachedCompression)
        except ValueError:
            cached = None
        if cached is not None and cached.inputs_sha256 == key:
            return cached.comparison, compressed
    comparison = evaluate_compression(full_package=full.path, compressed_package=fresh or compressed, run_dir=run_dir,
                                      dataset_dir=dataset_dir, full_cost=full_cost, tolerance=tolerance,
                                      aggregation=aggregation, budget_seconds=budget_seconds,
                                      n_bootstrap=n_bootstrap, seed=seed)
    write_model_json(cache, CachedCompression(inputs_sha256=key, comparison=comparison))
    return comparison, compressed
