"""Shipping a compared arm: its package, its deployment cost, and the compressed variant with its comparison, each
skipped when its inputs have not changed (tasks.common.reuse), so a re-run of an unchanged comparison ships in
seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_schemas.files import read_model_json, write_model_json
from data_schemas.package import PACKAGE_DIR, CachedCompression, CompressionComparison, DeploymentCost
from data_schemas.training import PREDICTIONS_FILE
from tasks.common.reuse import file_sha256, inputs_key
from tasks.packaging.deploy_cost import deploy_cost_task, evaluate_compression
from tasks.packaging.package import load_package, write_package
from tasks.packaging.quantize import write_compressed_package

COMPRESSED_PACKAGE_DIR = "package-compressed"  # beside the full package/ in the run folder
COMPRESSION_FILE = "compression.json"  # in the compressed package's folder: CachedCompression


@dataclass(frozen=True)
class ShippedArm:
    """One packaged and costed run: its package folder and its deployment cost."""

    package_dir: Path
    cost: DeploymentCost


def ship_run(*, run_dir: Path, dataset_dir: Path, threshold: float, threshold_rule: str, aggregation: str,
             metrics: dict[str, Any] | None, weights_path: Path | None, budget_seconds: float) -> ShippedArm:
    """RUN_DIR/package (write_package) and its deployment cost (deploy_cost_task), each kept when unchanged."""
    package_dir = Path(run_dir) / PACKAGE_DIR
    write_package(run_dir=run_dir, dataset_dir=dataset_dir, out_dir=package_dir, threshold=threshold,
                  threshold_rule=threshold_rule, aggregation=aggregation, metrics=metrics, weights_path=weights_path)
    return ShippedArm(package_dir=package_dir, cost=deploy_cost_task(package_dir, budget_seconds=budget_seconds))


def compress_and_compare(*, full_package: Path, dataset_dir: Path, full_cost: DeploymentCost, budget_seconds: float,
                         tolerance: float, aggregation: str, n_bootstrap: int,
                         seed: int) -> tuple[CompressionComparison, Path]:
    """The compressed variant beside a full package (RUN_DIR/package-compressed) and its comparison with the full
    one on the run's test images; both kept when their inputs are unchanged. Returns (comparison, its folder)."""
    full_package = Path(full_package)
    run_dir = full_package.parent
    compressed = write_compressed_package(
        load_package(full_package), dataset_dir, run_dir / COMPRESSED_PACKAGE_DIR
    ).parent
    key = inputs_key({"compressed": file_sha256(compressed / "model.pt"), "full_cost": full_cost.inputs_sha256,
                      "full": file_sha256(full_package / "model.pt"), "budget_seconds": budget_seconds,
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
    comparison = evaluate_compression(full_package=full_package, compressed_package=compressed, run_dir=run_dir,
                                      dataset_dir=dataset_dir, full_cost=full_cost, tolerance=tolerance,
                                      aggregation=aggregation, budget_seconds=budget_seconds,
                                      n_bootstrap=n_bootstrap, seed=seed)
    write_model_json(cache, CachedCompression(inputs_sha256=key, comparison=comparison))
    return comparison, compressed
