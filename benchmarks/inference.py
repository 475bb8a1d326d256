"""Do the deployment-cost figures (tasks.packaging.deploy_cost) match a bare torch.inference_mode() loop over the same
model?

    PYTHONPATH=. .venv/bin/python benchmarks/inference.py [--package PATH] [--size 112] [--threads N]
        [--precision auto|fp32|bf16] [--budget 10] [--int8]

1. Without --package: a small synthetic cohort is written, ingested at --size and one scratch epoch trained at
   --size (smoke profile), then packaged: a real package at the trained size (the weights' values do not change
   the cost of a forward pass).
2. tasks.packaging.deploy_cost's timing (time_model within a --budget of seconds: batch-1 latency as the median of
   per-forward timings after warm-up, batch-32 throughput), as the report quotes it.
3. A bare loop over the same module, input, precision and threads: warm-up, then one perf_counter pair around as
   many batch-1 forwards (mean latency) and batch-32 forwards (throughput) as time_model ran in that round. The two
   methods
   alternate for --rounds rounds and each figure is the median over rounds.
4. Prints both side by side with measured / bare ratios; the bar is agreement within 15% (0.85-1.15).
   With --int8 the compressed variant (calibrated on the training images) is measured the same way.

Timings on a shared machine are noisy: run it twice and quote both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_schemas.package import DeploymentCost  # noqa: E402
from tasks.packaging.deploy_cost import THROUGHPUT_BATCH_SIZE, measure_deployment_cost, sample_input, time_model  # noqa: E402
from tasks.packaging.package import load_package, write_package  # noqa: E402
from tasks.packaging.predict import PackagedModel, prepare_model  # noqa: E402

AGREEMENT = 0.15


def make_package(root: Path, size: int) -> tuple[Path, Path]:
    """A real package at `size` px: synthetic cohort -> ingest -> one smoke epoch -> package. (package, dataset)."""
    from data_schemas.plan import build_run_plan, write_plan
    from data_schemas.training import SPLITS_FILE
    from flows.ingest import ingest_flow
    from tasks.demo.synth import synthesize_cohort
    from tasks.training.train import train_arm

    cohort = synthesize_cohort(root / "cohort", patients=12, slices_per_patient=2, seed=3)
    dataset = root / "dataset"
    ingest_flow(src_dir=str(cohort.dicom_dir), out_dir=str(dataset), labels=str(cohort.labels_path), size=size,
                window="lung", workers=1)
    run_dir = root / "runs" / "scratch"
    plan = build_run_plan(profile="smoke", arms=["scratch"], seed=0, settings={"image_size": str(size), "epochs": "1"},
                          layout="single-arm")
    run_dir.mkdir(parents=True, exist_ok=True)
    plan_path = write_plan(run_dir, plan.model_copy(update={"splits_file": f"../{SPLITS_FILE}"}))
    summary = train_arm(dataset_dir=dataset, plan_path=plan_path, run=".")
    if summary.status != "completed":
        raise SystemExit(f"benchmark training run did not complete: {summary.reason}")
    package = write_package(run_dir=run_dir, dataset_dir=dataset, out_dir=run_dir / "package", threshold=0.5,
                            threshold_rule="fixed:0.5 (benchmark)", aggregation="mean", metrics=None).path
    return package, dataset


@torch.inference_mode()
def bare_loop(model: PackagedModel, x: torch.Tensor, *, warmup: int, runs: int) -> float:
    """Seconds per forward: one perf_counter pair around `runs` forwards after `warmup` untimed ones."""
    with model.runtime.threads(), model.runtime.autocast():
        for _ in range(warmup):
            model.module(x)
        start = time.perf_counter()
        for _ in range(runs):
            model.module(x)
        return (time.perf_counter() - start) / runs


def compare(package: Path, args: argparse.Namespace) -> tuple[DeploymentCost, float, float]:
    """(cost as deploy_cost measures it, bare batch-1 ms, bare batch-32 images/s) on the same model and input.

    The two methods alternate over --rounds rounds on one prepared model, and each figure is the median over rounds,
    so that load from other processes drifting during the run hits both alike.
    """
    cost = measure_deployment_cost(package, precision=args.precision, threads=args.threads, budget_seconds=args.budget)
    model = prepare_model(load_package(package), args.precision, args.threads)
    one, big = sample_input(model, 1), sample_input(model, THROUGHPUT_BATCH_SIZE, seed=1)
    measured, bare, pooled = [], [], []
    for _ in range(args.rounds):
        timing = time_model(model, args.budget)
        measured.append((float(np.median(timing.latency_ms)), timing.images_per_second))
        pooled.extend(timing.latency_ms)
        bare.append((1e3 * bare_loop(model, one, warmup=2, runs=len(timing.latency_ms)),
                     THROUGHPUT_BATCH_SIZE / bare_loop(model, big, warmup=1, runs=timing.batches)))
    latency_ms, ips = (float(np.median(column)) for column in zip(*measured))
    cost = cost.model_copy(update={"latency_ms_median": latency_ms, "throughput_images_per_second": ips,
                                   "latency_ms_p90": float(np.percentile(pooled, 90))})
    bare_ms, bare_ips = (float(np.median(column)) for column in zip(*bare))
    return cost, bare_ms, bare_ips


def report(label: str, cost: DeploymentCost, bare_ms: float, bare_ips: float) -> bool:
    """Print one variant's figures side by side; True when both agree within AGREEMENT."""
    latency_ratio, throughput_ratio = cost.latency_ms_median / bare_ms, cost.throughput_images_per_second / bare_ips
    ok = all(abs(ratio - 1) <= AGREEMENT for ratio in (latency_ratio, throughput_ratio))
    print(f"\n{label}: {cost.weights_variant} weights, {cost.precision}, {cost.threads} threads, {cost.image_size} px, "
          f"{cost.package_bytes / 1e6:.1f} MB, {cost.parameters / 1e6:.1f} M parameters, "
          f"{cost.forward_gflops_per_image:.2f} GFLOPs/image, channels-last {cost.channels_last}")
    print(f"  {'figure':<34}{'deploy_cost':>14}{'bare loop':>14}{'ratio':>8}")
    print(f"  {'batch-1 latency, ms (median|mean)':<34}{cost.latency_ms_median:>14.2f}{bare_ms:>14.2f}"
          f"{latency_ratio:>8.3f}")
    print(f"  {'batch-1 latency p90, ms':<34}{cost.latency_ms_p90:>14.2f}{'':>14}{'':>8}")
    print(f"  {'batch-32 throughput, images/s':<34}{cost.throughput_images_per_second:>14.1f}{bare_ips:>14.1f}"
          f"{throughput_ratio:>8.3f}")
    print(f"  agreement within {AGREEMENT:.0%}: {'yes' if ok else 'NO'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build or read a package, print the comparison; exit 1 when a figure disagrees."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="a model package (default: build one at --size)")
    parser.add_argument("--dataset", type=Path, help="its training dataset (for --int8 calibration with --package)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed forwards per round (time_model)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two methods (medians reported)")
    parser.add_argument("--int8", action="store_true", help="also measure the int8 variant")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ctcompare-inference-"))
    package, dataset = (args.package, args.dataset) if args.package else make_package(root, args.size)
    ok = report("full precision", *compare(package, args))
    if args.int8:
        from tasks.packaging.quantize import write_compressed_package

        if dataset is None:
            raise SystemExit("--int8 with --package needs --dataset (calibration uses the training images).")
        compressed = write_compressed_package(load_package(package), dataset, root / "package-int8")
        ok = report("compressed", *compare(compressed, args)) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
