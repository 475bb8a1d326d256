"""What a packaged model costs to run on this machine's CPU: size, FLOPs, batch-1 latency and batch-32 throughput.

Methods (each figure of data_schemas.package.DeploymentCost):
- parameters: sum of numel() over the float model's parameters (the int8 variant has the same count); a linear
  probe adds its coefficients (one per feature) + 1 intercept.
- package_bytes: os.stat size of model.pt (weights + metadata, as shipped).
- forward_gflops_per_image: tasks.training.models.count_flops / 1e9, torch's FlopCounterMode on the package's own
  float network (the arm's model; a linear probe's extractor cut at its depth) at the trained size: the module
  measured, or one built on the meta device (shapes only) for an int8 package (2 FLOPs per multiply-add;
  convolutions and matmuls only; a count depends on shapes alone). The probe's logistic regression adds
  2 x features, under 1e-5 of the total; int8 executes the same multiply-adds in int8.
- A fixed time budget, not a fixed count (time_budget_seconds; seconds per package whatever the model's speed),
  each phase ending at its share of the budget counted from the start: WARMUP_SHARE of it in untimed batch-1
  forwards (at least one: oneDNN/fbgemm pick kernels and allocate on the first calls), up to WARMUP_SHARE +
  LATENCY_SHARE in timed batch-1 forwards (at least MIN_TIMED_RUNS), the rest in one untimed batch (when the budget
  has time left for it; otherwise the one timed batch includes that first call) and then timed batches (at least
  one). The minimum counts can take longer than a short budget on a slow or busy machine.
- latency_ms_median / latency_ms_p90: the `timed_runs` forwards of one image, each timed alone with
  time.perf_counter() around the forward under torch.inference_mode() and the package's autocast; median and the
  90th percentile (numpy linear interpolation) of those times. The image is seeded noise, already normalised:
  a network's cost does not depend on pixel values.
- throughput_images_per_second: the timed forwards of `throughput_batch_size` images; images / their seconds.
- threads, precision, channels_last: the runtime the figures were measured with (tasks.packaging.predict.prepare_model:
  bf16 autocast + channels-last where tasks.common.runtime.cpu_has_fast_bf16 says the CPU gains; int8 kernels for int8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from data_schemas.files import read_model_json, read_models_csv, sha256_json, write_model_json
from data_schemas.package import DEPLOY_COST_FILE, CompressionComparison, DeploymentCost, ModelPackageMeta
from data_schemas.training import PREDICTIONS_FILE as RUN_PREDICTIONS_FILE, PredictionRow
from tasks.common.environment import cpu_name
from tasks.common.reuse import checksums_hold, file_sha256, inputs_key
from tasks.common.runtime import Runtime
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.background import wait_for_writes
from tasks.packaging.package import (
    LoadedPackage,
    architecture_key,
    load_package,
    meta_architecture,
    package_file,
    write_card,
)
from tasks.packaging.predict import PackagedModel, default_threads, predict_images, predict_runtime, prepare_model
from tasks.packaging.quantize import PairedPredictions, compare_compression
from tasks.training.models import count_flops

THROUGHPUT_BATCH_SIZE = 32
DEFAULT_TIME_BUDGET_S = 10.0  # per package
QUICK_TIME_BUDGET_S = 0.1  # the smoke profile: a few forwards, enough to run each phase (the report says so)
WARMUP_SHARE, LATENCY_SHARE = 0.15, 0.45  # of the budget; throughput batches get the rest
MIN_TIMED_RUNS = 3
MAX_FORWARDS = 2000  # per phase: a tiny model on a fast CPU stops here before its budget ends


def sample_input(model: PackagedModel, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A seeded, normalised batch at the trained size in the runtime's memory format."""
    recipe = model.package.meta.recipe
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, recipe.train_image_size, recipe.train_image_size, generator=generator)
    x = (x - recipe.normalisation_mean) / recipe.normalisation_std
    return x.contiguous(memory_format=torch.channels_last) if model.runtime.channels_last else x


@dataclass(frozen=True)
class Timing:
    """What time_model measured: batch-1 forward times (ms), batch throughput, and how many forwards of each."""

    latency_ms: np.ndarray
    images_per_second: float
    warmup_runs: int
    batches: int


@torch.inference_mode()
def forwards_within(model: PackagedModel, x: torch.Tensor, seconds: float, *, min_runs: int) -> list[float]:
    """Seconds of each forward of x (one perf_counter pair per forward), run until `seconds` have passed, at least
    `min_runs` and at most MAX_FORWARDS times."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < MAX_FORWARDS):
        start = time.perf_counter()
        with model.runtime.autocast():
            model.module(x)
        times.append(time.perf_counter() - start)
    return times


_ARCHITECTURE_FIGURES: dict[str, tuple[int, float]] = {}  # architecture_key -> (parameters, FLOPs per image)


def architecture_figures(meta: ModelPackageMeta, network: nn.Module | None = None) -> tuple[int, float]:
    """(parameters, FLOPs of one forward of one image) of the package's float network (module doc), counted once per
    architecture and size in this process: on `network` (that float network, in eval mode) when given, else on a
    build on the meta device."""
    key = architecture_key(meta)
    if key not in _ARCHITECTURE_FIGURES:
        network = network if network is not None else meta_architecture(meta).eval()
        _ARCHITECTURE_FIGURES[key] = (sum(p.numel() for p in network.parameters()),
                                      count_flops(network, meta.recipe.train_image_size, 1, batch=1))
    return _ARCHITECTURE_FIGURES[key]


def parameter_count(model: PackagedModel) -> int:
    """Parameters of the float architecture (+ a linear probe's coefficients and intercept)."""
    meta = model.package.meta
    count = architecture_figures(meta, _float_network(model))[0]
    return count + (len(meta.linear_probe.coef) + 1 if meta.linear_probe is not None else 0)


def forward_flops(model: PackagedModel) -> float:
    """FLOPs of one forward pass of one image through the package's float network (module doc)."""
    return architecture_figures(model.package.meta, _float_network(model))[1]


def _float_network(model: PackagedModel) -> nn.Module | None:
    """The prepared model's module when it is the float network (not int8 kernels)."""
    return None if model.precision == "int8" else model.module


def time_model(model: PackagedModel, budget_seconds: float) -> Timing:
    """Batch-1 forward times in ms (each timed alone) and batch-32 images per second within a time budget, as the
    module doc says, in the runtime's threads; once every file being written in the background has been written
    (tasks.packaging.background), so that nothing else runs while it is timed."""
    wait_for_writes()
    with model.runtime.threads():
        return _time_model(model, budget_seconds)


def _time_model(model: PackagedModel, budget_seconds: float) -> Timing:
    """time_model's phases."""
    started = time.perf_counter()

    def left_until(share: float) -> float:
        return started + share * budget_seconds - time.perf_counter()

    one = sample_input(model, 1)
    warmup = forwards_within(model, one, left_until(WARMUP_SHARE), min_runs=1)
    latency = forwards_within(model, one, left_until(WARMUP_SHARE + LATENCY_SHARE), min_runs=MIN_TIMED_RUNS)
    big = sample_input(model, THROUGHPUT_BATCH_SIZE, seed=1)
    if left_until(1.0) > 0:  # the first call at a new batch size allocates: untimed while the budget allows
        forwards_within(model, big, 0.0, min_runs=1)
    batches = forwards_within(model, big, left_until(1.0), min_runs=1)
    return Timing(
        latency_ms=np.asarray(latency) * 1e3,
        images_per_second=THROUGHPUT_BATCH_SIZE * len(batches) / sum(batches),
        warmup_runs=len(warmup),
        batches=len(batches),
    )


def measure_deployment_cost(package_path: Path, *, precision: str = "auto", threads: int | None = None,
                            budget_seconds: float = DEFAULT_TIME_BUDGET_S) -> DeploymentCost:
    """Measure one package as the module docstring describes, within `budget_seconds` of forwards."""
    if not budget_seconds > 0:
        raise ValueError(f"budget_seconds must be > 0; got {budget_seconds}.")
    return prepared_model_cost(prepare_model(load_package(package_path), precision, threads), budget_seconds)


def prepared_model_cost(model: PackagedModel, budget_seconds: float) -> DeploymentCost:
    """measure_deployment_cost on a model already prepared (so that one int8 conversion serves several uses)."""
    parameters, flops = parameter_count(model), forward_flops(model)  # counted before the timing, not during it
    timing = time_model(model, budget_seconds)
    latency = timing.latency_ms
    package = model.package
    meta = package.meta
    return DeploymentCost(
        arm=meta.arm, weights_variant=meta.weights_variant, parameters=parameters,
        package_bytes=package.size(), image_size=meta.recipe.train_image_size,
        forward_gflops_per_image=flops / 1e9,
        latency_ms_median=float(np.median(latency)), latency_ms_p90=float(np.percentile(latency, 90)),
        throughput_images_per_second=timing.images_per_second, throughput_batch_size=THROUGHPUT_BATCH_SIZE,
        warmup_runs=timing.warmup_runs, timed_runs=len(latency), time_budget_seconds=budget_seconds,
        threads=model.runtime.num_threads, precision=model.precision,
        channels_last=model.runtime.channels_last, cpu=cpu_name(), torch_version=torch.__version__,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def cost_inputs_key(package_sha256: str, precision: str, threads: int | None, budget_seconds: float) -> str:
    """The inputs key of a measurement (tasks.common.reuse): model.pt's SHA-256, the requested runtime, the budget,
    this CPU and torch."""
    return inputs_key({"package": package_sha256, "precision": precision,
                       "threads": threads or default_threads(), "budget_seconds": budget_seconds, "cpu": cpu_name(),
                       "torch": torch.__version__})


def recorded_cost(folder: Path, key: str) -> DeploymentCost | None:
    """deploy_cost.json in a package folder when it was measured with this inputs key and the card is intact."""
    path = Path(folder) / DEPLOY_COST_FILE
    try:
        cost = read_model_json(path, DeploymentCost) if path.is_file() else None
    except ValueError:
        return None
    return cost if cost is not None and cost.inputs_sha256 == key and checksums_hold(folder) else None


def record_cost(package: LoadedPackage, cost: DeploymentCost, key: str) -> DeploymentCost:
    """Write deploy_cost.json (with its inputs key) beside the package's model.pt and the figures into its model
    card."""
    cost = cost.model_copy(update={"inputs_sha256": key})
    write_model_json(package.path.parent / DEPLOY_COST_FILE, cost)
    write_card(package, cost)
    return cost


@task(
    name="deploy-cost",
    cache_policy=NO_CACHE,
    task_run_name="deploy-cost-{package_path.parent.parent.name}-{package_path.parent.name}",
)
def deploy_cost_task(package_path: Path, precision: str = "auto", threads: int | None = None, *,
                     budget_seconds: float = DEFAULT_TIME_BUDGET_S, reuse: bool = True) -> DeploymentCost:
    """Measure a package, write deploy_cost.json beside its model.pt and add the figures to its model card; figures
    measured from the same inputs (same model.pt, runtime, budget, CPU and torch) are kept (reuse).

    Run one at a time: the timings need the CPU to themselves. budget_seconds: see the module doc (the smoke profile
    passes QUICK_TIME_BUDGET_S, whose figures the report marks as too noisy to quote).
    """
    return package_cost(package_path, precision, threads, budget_seconds=budget_seconds, reuse=reuse)


def package_cost(package: Path | LoadedPackage, precision: str = "auto", threads: int | None = None, *,
                 budget_seconds: float = DEFAULT_TIME_BUDGET_S, reuse: bool = True,
                 timings: dict[str, DeploymentCost] | None = None) -> DeploymentCost:
    """deploy_cost_task's work on a package's path, or on a package this process holds (then not read again).

    timings: the figures of packages measured before in the same stage, by timing_key; a package of the same network
    at the same size and runtime takes the timing from there (timed_on names the package timed) instead of running
    its own forwards, since a forward's cost depends on the shapes and the runtime, not on the weights' values.
    """
    model_path = package.path if isinstance(package, LoadedPackage) else package_file(package)
    digest = package.sha256 if isinstance(package, LoadedPackage) else file_sha256(model_path)
    key = cost_inputs_key(digest, precision, threads, budget_seconds)
    if reuse and (cached := recorded_cost(model_path.parent, key)) is not None:
        return cached
    loaded = package if isinstance(package, LoadedPackage) else load_package(model_path)
    same = timing_key(loaded.meta, predict_runtime(loaded.meta, precision, threads), budget_seconds)
    if timings is not None and same in timings:
        timed = timings[same]
        cost = timed.model_copy(update={"arm": loaded.meta.arm, "package_bytes": loaded.size(),
                                        "timed_on": timed.timed_on or timed.arm})
    else:
        cost = prepared_model_cost(prepare_model(loaded, precision, threads), budget_seconds)
        if timings is not None:
            timings[same] = cost
    return record_cost(loaded, cost, key)


def timing_key(meta: ModelPackageMeta, runtime: Runtime, budget_seconds: float) -> str:
    """What a package's timed figures depend on in this process: its network and size (architecture_key), its weights
    variant, the runtime (precision, threads, memory format) and the time budget."""
    return sha256_json({"network": architecture_key(meta), "variant": meta.weights_variant,
                        "precision": runtime.precision, "threads": runtime.num_threads,
                        "channels_last": runtime.channels_last, "budget_seconds": budget_seconds})


def run_test_images(run_dir: Path, dataset_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The run's own test images (predictions.csv order), their 0/1 targets and patient keys."""
    rows = read_models_csv(Path(run_dir) / RUN_PREDICTIONS_FILE, PredictionRow)
    dataset = load_dataset(Path(dataset_dir), in_memory=False)
    index_of = {row.image_key: row.index for row in dataset.manifest}
    images = np.asarray(dataset.images[[index_of[row.image_key] for row in rows]], dtype=np.float32)
    return images, np.array([row.target for row in rows]), [row.patient_key for row in rows]


def evaluate_compression(*, full_package: Path, compressed_package: Path | PackagedModel, run_dir: Path,
                         dataset_dir: Path, full_cost: DeploymentCost, tolerance: float, aggregation: str = "mean",
                         budget_seconds: float = DEFAULT_TIME_BUDGET_S, n_bootstrap: int = 1000,
                         seed: int = 0) -> CompressionComparison:
    """Measure the compressed package (as deploy_cost_task does: deploy_cost.json, figures in its card) and put it
    beside the full one on the run's own test images (tasks.packaging.quantize.compare_compression).

    The full-precision side is the run's predictions.csv, the very predictions the report's metric tables are
    computed from; the compressed package predicts the same images as `ctcompare predict` runs it by default (int8
    kernels, or bf16 weights under the runtime's choice), prepared once for timing and predictions (an int8
    conversion takes seconds; a PackagedModel given for compressed_package is that prepared model, e.g. the module
    the quantization has just converted). full_package names the package the compressed one was made from.
    """
    if isinstance(compressed_package, PackagedModel):
        small = compressed_package
    else:
        small = prepare_model(load_package(compressed_package), "auto")
    compressed_cost = record_cost(small.package, prepared_model_cost(small, budget_seconds),
                                  cost_inputs_key(small.package.sha256, "auto", None, budget_seconds))
    rows = read_models_csv(Path(run_dir) / RUN_PREDICTIONS_FILE, PredictionRow)
    images, targets, patients = run_test_images(run_dir, dataset_dir)
    pred = PairedPredictions(targets=targets, patients=patients, full=np.array([row.prob_positive for row in rows]),
                             compressed=predict_images(small, images, progress=False))
    return compare_compression(full_cost, compressed_cost, pred, tolerance=tolerance, aggregation=aggregation,
                               n_bootstrap=n_bootstrap, seed=seed,
                               reference=f"the report's tables (the packaged run's {RUN_PREDICTIONS_FILE})")
