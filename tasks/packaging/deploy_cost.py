"""What a packaged model costs to run on this machine's CPU: size, FLOPs, batch-1 latency and batch-32 throughput.

Methods (each figure of data_schemas.package.DeploymentCost):
- parameters: sum of numel() over the float model's parameters (the int8 variant has the same count); a linear
  probe adds its 2048 coefficients + 1 intercept.
- package_bytes: os.stat size of model.pt (weights + metadata, as shipped).
- forward_gflops_per_image: tasks.training.models.forward_flops_per_image(train_image_size) / 1e9, torch's FlopCounterMode
  on the ResNet-50 at the trained size (2 FLOPs per multiply-add; convolutions and matmuls only). A linear probe's
  head differs by < 1e-5 of the total; int8 executes the same multiply-adds in int8.
- latency_ms_median / latency_ms_p90: `warmup_runs` untimed batch-1 forwards (oneDNN/fbgemm pick kernels and
  allocate on the first calls), then `timed_runs` forwards of one image, each timed alone with
  time.perf_counter() around the forward under torch.inference_mode() and the package's autocast; median and the
  90th percentile (numpy linear interpolation) of those times. The image is seeded noise, already normalised:
  ResNet-50's cost does not depend on pixel values.
- throughput_images_per_second: 2 untimed batches (fewer when warmup_runs < 2), then `batches` forwards of `throughput_batch_size` images timed
  together; images / seconds.
- threads, precision, channels_last: the runtime the figures were measured with (tasks.packaging.predict.prepare_model:
  bf16 autocast + channels-last where tasks.common.runtime.cpu_has_fast_bf16 says the CPU gains; int8 kernels for int8).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from data_schemas.files import read_models_csv, write_model_json
from data_schemas.package import DEPLOY_COST_FILE, CompressionComparison, DeploymentCost
from data_schemas.training import PREDICTIONS_FILE as RUN_PREDICTIONS_FILE
from data_schemas.training import PredictionRow
from tasks.common.environment import cpu_name
from tasks.ingest.dataset_store import load_dataset
from tasks.training.models import forward_flops_per_image
from tasks.packaging.package import float_architecture, load_package, package_file, write_card
from tasks.packaging.predict import PackagedModel, predict_images, prepare_model
from tasks.packaging.quantize import PairedPredictions, compare_compression

DEFAULT_WARMUP_RUNS = 10
DEFAULT_TIMED_RUNS = 50
THROUGHPUT_BATCH_SIZE = 32
DEFAULT_THROUGHPUT_BATCHES = 5
# Seconds instead of a minute per arm, for the smoke profile and tests: figures too noisy to quote.
QUICK_TIMING: dict[str, int] = {"warmup": 0, "runs": 2, "batches": 1}


def sample_input(model: PackagedModel, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A seeded, normalised batch at the trained size in the runtime's memory format."""
    recipe = model.package.meta.recipe
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, recipe.train_image_size, recipe.train_image_size, generator=generator)
    x = (x - recipe.normalisation_mean) / recipe.normalisation_std
    return x.contiguous(memory_format=torch.channels_last) if model.runtime.channels_last else x


@torch.inference_mode()
def forward_seconds(model: PackagedModel, x: torch.Tensor, *, warmup: int, runs: int) -> list[float]:
    """Seconds of each of `runs` forwards of x after `warmup` untimed ones (one perf_counter pair per forward)."""
    for _ in range(warmup):
        with model.runtime.autocast():
            model.module(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with model.runtime.autocast():
            model.module(x)
        times.append(time.perf_counter() - start)
    return times


def parameter_count(model: PackagedModel) -> int:
    """Parameters of the float architecture (+ a linear probe's coefficients and intercept)."""
    meta = model.package.meta
    count = sum(p.numel() for p in float_architecture(meta).parameters())
    return count + (len(meta.linear_probe.coef) + 1 if meta.linear_probe is not None else 0)


def time_model(model: PackagedModel, *, warmup: int, runs: int, batches: int) -> tuple[np.ndarray, float]:
    """Batch-1 forward times in ms (each timed alone) and batch-32 images per second, as the module doc says."""
    latency_ms = np.asarray(forward_seconds(model, sample_input(model, 1), warmup=warmup, runs=runs)) * 1e3
    big = sample_input(model, THROUGHPUT_BATCH_SIZE, seed=1)
    batch_times = forward_seconds(model, big, warmup=min(2, warmup), runs=batches)
    return latency_ms, THROUGHPUT_BATCH_SIZE * batches / sum(batch_times)


def measure_deployment_cost(package_path: Path, *, precision: str = "auto", threads: int | None = None,
                            warmup: int = DEFAULT_WARMUP_RUNS, runs: int = DEFAULT_TIMED_RUNS,
                            batches: int = DEFAULT_THROUGHPUT_BATCHES) -> DeploymentCost:
    """Measure one package as the module docstring describes."""
    if warmup < 0 or runs < 1 or batches < 1:
        raise ValueError(f"warmup must be >= 0 and runs, batches >= 1; got {warmup}, {runs}, {batches}.")
    return prepared_model_cost(prepare_model(load_package(package_path), precision, threads), warmup=warmup, runs=runs,
                               batches=batches)


def prepared_model_cost(model: PackagedModel, *, warmup: int, runs: int, batches: int) -> DeploymentCost:
    """measure_deployment_cost on a model already prepared (so that one int8 conversion serves several uses)."""
    latency, images_per_second = time_model(model, warmup=warmup, runs=runs, batches=batches)
    package = model.package
    meta = package.meta
    return DeploymentCost(
        arm=meta.arm, weights_variant=meta.weights_variant, parameters=parameter_count(model),
        package_bytes=package.path.stat().st_size, image_size=meta.recipe.train_image_size,
        forward_gflops_per_image=forward_flops_per_image(meta.recipe.train_image_size) / 1e9,
        latency_ms_median=float(np.median(latency)), latency_ms_p90=float(np.percentile(latency, 90)),
        throughput_images_per_second=images_per_second, throughput_batch_size=THROUGHPUT_BATCH_SIZE,
        warmup_runs=warmup, timed_runs=runs, threads=model.runtime.num_threads, precision=model.precision,
        channels_last=model.runtime.channels_last, cpu=cpu_name(), torch_version=torch.__version__,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


@task(name="deploy-cost", cache_policy=NO_CACHE, task_run_name="deploy-cost-{package_path.parent.parent.name}-{package_path.parent.name}")
def deploy_cost_task(package_path: Path, precision: str = "auto", threads: int | None = None, *,
                     warmup: int = DEFAULT_WARMUP_RUNS, runs: int = DEFAULT_TIMED_RUNS,
                     batches: int = DEFAULT_THROUGHPUT_BATCHES) -> DeploymentCost:
    """Measure a package, write deploy_cost.json beside its model.pt and add the figures to its model card.

    Run one at a time: the timings need the CPU to themselves. warmup/runs/batches: see the module doc (the smoke
    profile passes QUICK_TIMING, whose figures say so through timed_runs).
    """
    cost = measure_deployment_cost(package_path, precision=precision, threads=threads, warmup=warmup, runs=runs,
                                   batches=batches)
    folder = package_file(package_path).parent
    write_model_json(folder / DEPLOY_COST_FILE, cost)
    write_card(folder, load_package(folder).meta, cost)
    return cost


def run_test_images(run_dir: Path, dataset_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The run's own test images (predictions.csv order), their 0/1 targets and patient keys."""
    rows = read_models_csv(Path(run_dir) / RUN_PREDICTIONS_FILE, PredictionRow)
    dataset = load_dataset(Path(dataset_dir), in_memory=False)
    index_of = {row.image_key: row.index for row in dataset.manifest}
    images = np.asarray(dataset.images[[index_of[row.image_key] for row in rows]], dtype=np.float32)
    return images, np.array([row.target for row in rows]), [row.patient_key for row in rows]


def evaluate_compression(*, full_package: Path, compressed_package: Path, run_dir: Path, dataset_dir: Path,
                         full_cost: DeploymentCost, tolerance: float, aggregation: str = "mean",
                         timing: dict[str, int] | None = None, n_bootstrap: int = 1000, seed: int = 0) -> CompressionComparison:
    """Measure the compressed package (as deploy_cost_task does: deploy_cost.json, figures in its card) and put it
    beside the full one on the run's own test images (tasks.packaging.quantize.compare_compression).

    The full-precision side is the run's predictions.csv, the very predictions the report's metric tables are
    computed from; the compressed package predicts the same images as `ctcompare predict` runs it by default (int8
    kernels, or bf16 weights under the runtime's choice), prepared once for timing and predictions (an int8
    conversion takes seconds). full_package names the package the compressed one was made from.
    """
    small = prepare_model(load_package(compressed_package), "auto")
    compressed_cost = prepared_model_cost(small, **{"warmup": DEFAULT_WARMUP_RUNS, "runs": DEFAULT_TIMED_RUNS,
                                                    "batches": DEFAULT_THROUGHPUT_BATCHES, **(timing or {})})
    folder = package_file(compressed_package).parent
    write_model_json(folder / DEPLOY_COST_FILE, compressed_cost)
    write_card(folder, small.package.meta, compressed_cost)
    rows = read_models_csv(Path(run_dir) / RUN_PREDICTIONS_FILE, PredictionRow)
    images, targets, patients = run_test_images(run_dir, dataset_dir)
    pred = PairedPredictions(targets=targets, patients=patients, full=np.array([row.prob_positive for row in rows]),
                             compressed=predict_images(small, images, progress=False))
    return compare_compression(full_cost, compressed_cost, pred, tolerance=tolerance, aggregation=aggregation,
                               n_bootstrap=n_bootstrap, seed=seed,
                               reference=f"the report's tables (the packaged run's {RUN_PREDICTIONS_FILE})")
