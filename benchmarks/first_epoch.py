"""Does a real training epoch agree with the calibration, as the first-epoch check judges it?

    .venv/bin/python benchmarks/first_epoch.py [--images 256] [--profile cpu] [--epochs 2]

1. Calibrates this machine fresh at the profile's training size and precision (tasks.cost.calibration).
2. Trains the scratch ResNet-50 arm for real with the training loop's own epoch (tasks.training.loop.train_one_epoch:
   seeded order, batched augmentation, the profile's precision and memory format) on random images.
3. Prints, per epoch, its training part against the calibrated compute for the same images (up to the calibration's
   warm-up more on the first epoch), and measured / predicted: the ratio tasks.cost.first_epoch compares with
   1 +- 20% (1 anywhere inside the predicted range).

Timings on a shared machine are noisy: the load average is printed beside each figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_schemas.cost import THIS_MACHINE  # noqa: E402
from data_schemas.training import PROFILE_NAMES, resolve_train_config  # noqa: E402
from tasks.common.runtime import choose_runtime  # noqa: E402
from tasks.cost.calibration import calibrate_this_machine, describe_calibration  # noqa: E402
from tasks.cost.estimate import build_cost_report, resolve_cost_inputs  # noqa: E402
from tasks.cost.first_epoch import FIRST_EPOCH_TOLERANCE, FirstEpochCheck  # noqa: E402
from tasks.training.loop import make_setup, train_one_epoch  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="training images (random)")
    parser.add_argument("--profile", default="cpu", choices=PROFILE_NAMES)
    parser.add_argument("--epochs", type=int, default=2, help="epochs to time")
    args = parser.parse_args()

    config = resolve_train_config(args.profile, "scratch", {})
    runtime = choose_runtime(config)
    size = config.image_size
    print(f"{args.images} images at {size} px, {runtime.precision}, {torch.get_num_threads()} threads; "
          f"load {os.getloadavg()[0]:.1f}")
    calibration = calibrate_this_machine(size, 1, runtime.precision, config.batch_size)
    print(f"calibration: {describe_calibration(calibration)}")
    inputs = resolve_cost_inputs(n_images=args.images, image_size=size, epochs=config.epochs, arms=["scratch"],
                                 batch_size=config.batch_size)
    arm = build_cost_report(inputs, calibration=calibration).arm("scratch")
    machine = next(d for d in arm.devices if d.device == THIS_MACHINE)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.images, 1, size, size, generator=generator), torch.arange(args.images) % 2
    setup = make_setup(config=config, runtime=runtime, backbone=None, seed=0, y_train=y, arm="scratch")
    for epoch in range(args.epochs):
        started = time.perf_counter()
        result = train_one_epoch(setup, x, y, epoch, None)
        measured = time.perf_counter() - started
        compute = result.images * arm.train_flops_per_image / machine.effective_flops_per_second
        warm_up = machine.overhead_seconds if epoch == 0 else 0.0
        check = FirstEpochCheck(arm="scratch", measured_s=measured, predicted_s=(compute, compute + warm_up),
                                rest_s=(0.0, 0.0), total_s=(0.0, 0.0), training_s=(0.0, 0.0), calibration="")
        verdict = f"more than {FIRST_EPOCH_TOLERANCE:.0%} off" if check.disagrees else "agrees"
        print(f"epoch {epoch + 1}: {result.images} images, training part {measured:.1f} s, calibration predicts "
              f"{compute:.1f} s to {compute + warm_up:.1f} s: measured / predicted {check.ratio:.2f} ({verdict}); "
              f"load {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
