"""Does the cost estimate for "this machine" match a real short training run?

    .venv/bin/python benchmarks/cost.py [--images 64] [--size 64] [--epochs 3] [--batch-size 16] [--cached]

1. Calibrates this machine (matrix-product rate + a few ResNet-50 training steps; fresh unless --cached).
2. Estimates the scratch arm for the run below with tasks.cost.estimate (FLOPs counted, time = FLOPs / calibrated rate).
3. Trains ResNet-50 for real as training does (channels_last, bf16 autocast when the CPU supports it, Adam,
   cross-entropy, shuffled batches from in-memory images) and times it, first-step kernel warm-up included.
4. Prints estimated vs measured seconds and measured / estimated (the issue's bar: within 25%, i.e. 0.75-1.25).

Timings on a shared machine are noisy: run it twice and quote both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tasks.cost import (
    calibration as cost_calibration,  # noqa: E402
    estimate as cost_estimate,  # noqa: E402
    flops as cost_flops,  # noqa: E402
)


def train_for_real(n_images: int, size: int, epochs: int, batch_size: int, precision: str) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    model = cost_flops.phase_model("full", 1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(n_images, 1, size, size)
    labels = torch.arange(n_images) % 2
    autocast_on = precision == "bf16"
    epoch_times = []
    start = time.perf_counter()
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(n_images)
        for i in range(0, n_images, batch_size):
            idx = order[i : i + batch_size]
            x = images[idx].contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
                loss = nn.functional.cross_entropy(model(x), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        epoch_times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, epoch_times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cached", action="store_true", help="reuse a cached calibration instead of measuring")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    calibration = cost_calibration.load_or_calibrate(args.size, 1, "bf16", args.batch_size, refresh=not args.cached)
    calib_s = time.perf_counter() - t0
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=args.images, image_size=args.size, epochs=args.epochs, batch_size=args.batch_size, arms=["scratch"]
    )
    report = cost_estimate.build_cost_report(inputs, calibration=calibration)
    estimate = cost_estimate.estimated_seconds_for(report.arm("scratch"), "this-machine")

    measured, epoch_times = train_for_real(args.images, args.size, args.epochs, args.batch_size, calibration.precision)
    ratio = measured / estimate
    steady = sum(epoch_times[1:]) / max(1, len(epoch_times) - 1) * args.epochs if len(epoch_times) > 1 else measured
    result = {
        "load_average_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu": calibration.cpu_model,
        "threads": calibration.threads,
        "torch": calibration.torch_version,
        "precision": calibration.precision,
        "calibration_seconds": round(calib_s, 1),
        "matmul_gflops": round(calibration.matmul_flops_per_second / 1e9, 1),
        "calibrated_train_images_per_second": round(calibration.train_images_per_second, 2),
        "utilisation": round(calibration.utilisation, 3),
        "calibrated_warmup_seconds": round(calibration.warmup_seconds, 2),
        "run": f"{args.images} images x {args.epochs} epochs, {args.size} px, batch {args.batch_size}",
        "train_gflops_per_image": round(report.arm("scratch").train_flops_per_image / 1e9, 3),
        "estimated_seconds": round(estimate, 2),
        "measured_seconds": round(measured, 2),
        "epoch_seconds": [round(t, 2) for t in epoch_times],
        "measured_over_estimate": round(ratio, 3),
        "steady_state_over_estimate": round(steady / estimate, 3),
        "within_25_percent": 0.75 <= ratio <= 1.25,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
