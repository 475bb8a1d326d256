"""Training throughput: the pipeline's epoch (augmentation on) against a bare loop and a MONAI-tutorial-style loop.

    .venv/bin/python benchmarks/train.py [--images 192] [--size 112] [--batch-size 32] [--repeats 2] [--workers 0]

Same model (tasks.training.models scratch ResNet-50, 1 channel), same in-memory tensors, one process, no Prefect:
  pipeline   the training step `ctcompare train` runs: tasks.training.loop.make_setup (model, AdamW groups, class
             weights) and train_one_epoch (seeded order, batched augmentation, label smoothing, lr schedule,
             autocast + channels-last as tasks.common.runtime.choose_runtime picks them for this machine)
  bare       the same precision and memory format, no augmentation, no schedule: slice, forward, backward, step
  tutorial   how the MONAI tutorials write it: fp32, contiguous, per-sample Rand* transforms (rotate, zoom, flip,
             intensity scale/shift, Gaussian noise) in a torch DataLoader (--workers, default 0 on this 2-core box)
  tutorial+  the same tutorial loop with the pipeline's precision and memory format (bf16 autocast and
             channels-last where choose_runtime picks them): the peer that is not only fp32
Each loop runs a few warm-up steps first (kernel selection), then is timed over --images images; each is repeated
--repeats times, interleaved, and the best repeat is kept (shared machines are noisy: quote two runs).
Model FLOPs utilisation = 3 x forward FLOPs per image x images/s / peak, with the peak the cost stage measures
(tasks.cost.calibration: square matrix products at the same precision).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from data_schemas.training import resolve_train_config  # noqa: E402
from tasks.common.runtime import Runtime, choose_runtime  # noqa: E402
from tasks.training.augment import normalise  # noqa: E402
from tasks.training.loop import make_optimizer, make_setup, param_groups, train_one_epoch  # noqa: E402
from tasks.training.models import forward_flops_per_image, scratch_resnet50  # noqa: E402


def _model(rt: Runtime, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = scratch_resnet50(dropout=0.2).to(rt.device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def pipeline_loop(x, y, cfg, rt, warmup_steps: int) -> float:
    """The pipeline's own set-up and epoch (tasks.training.loop), as tasks.training.train runs them for the scratch
    arm."""
    setup = make_setup(config=cfg, runtime=rt, backbone=None, seed=0, y_train=y, arm="scratch")
    n_warm = warmup_steps * cfg.batch_size
    train_one_epoch(setup, x[:n_warm], y[:n_warm], 0)
    start = time.perf_counter()
    result = train_one_epoch(setup, x, y, 1)
    return result.images / (time.perf_counter() - start)


def bare_loop(x, y, cfg, rt, warmup_steps: int) -> float:
    model = _model(rt, rt.channels_last).train()
    optimizer = make_optimizer(param_groups(model, cfg, 1.0), cfg)
    b = cfg.batch_size

    def step(i: int) -> None:
        xb = normalise(x[i * b : (i + 1) * b])
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), y[i * b : (i + 1) * b])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(warmup_steps):
        step(i)
    steps = x.shape[0] // b
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * b / (time.perf_counter() - start)


def tutorial_loop(x, y, cfg, workers: int, warmup_steps: int, rt: Runtime | None = None) -> float:
    """The MONAI-tutorial loop: fp32 and contiguous, or with rt's autocast and memory format when rt is given."""
    import contextlib

    from monai.data import DataLoader, Dataset
    from monai.transforms import (
        Compose,
        NormalizeIntensity,
        RandFlip,
        RandGaussianNoise,
        RandRotate,
        RandScaleIntensity,
        RandShiftIntensity,
        RandZoom,
    )

    transforms = Compose([
        RandRotate(range_x=0.17, prob=1.0, keep_size=True),
        RandZoom(min_zoom=0.9, max_zoom=1.1, prob=1.0, keep_size=True),
        RandFlip(spatial_axis=1, prob=0.5),
        RandScaleIntensity(factors=0.1, prob=1.0),
        RandShiftIntensity(offsets=0.05, prob=1.0),
        RandGaussianNoise(std=0.01, prob=1.0),
        NormalizeIntensity(subtrahend=0.449, divisor=0.226),
    ])
    data = [{"img": x[i], "label": int(y[i])} for i in range(x.shape[0])]

    class _Wrap(Dataset):
        def __getitem__(self, index):
            item = self.data[index]
            return transforms(item["img"]).as_tensor(), item["label"]

    loader = DataLoader(_Wrap(data), batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    channels_last = rt is not None and rt.channels_last
    model = scratch_resnet50(dropout=0.2).train()
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_function = torch.nn.CrossEntropyLoss()
    autocast = rt.autocast if rt is not None else contextlib.nullcontext

    def epoch(limit: int | None) -> int:
        seen = 0
        for i, (inputs, labels) in enumerate(loader):
            if limit is not None and i >= limit:
                break
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            with autocast():
                logits = model(inputs)
            loss = loss_function(logits.float(), labels)
            loss.backward()
            optimizer.step()
            seen += inputs.shape[0]
        return seen

    epoch(warmup_steps)
    start = time.perf_counter()
    seen = epoch(None)
    return seen / (time.perf_counter() - start)


def measured_peak(size: int, precision: str) -> tuple[float, str]:
    """The cost stage's peak for this machine (cached calibration when present), else a fresh matmul probe."""
    from tasks.cost import calibration as cost
    try:
        calibration = cost.load_or_calibrate(size, 1, precision)
        return calibration.matmul_flops_per_second, "tasks.cost.calibration (matrix-product rate)"
    except Exception as error:  # noqa: BLE001
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return cost._matmul_rate(dtype), (f"tasks.cost.calibration._matmul_rate ({type(error).__name__} from "
                                          "calibration)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the tutorial-style loop")
    parser.add_argument("--skip-tutorial", action="store_true")
    args = parser.parse_args(argv)

    cfg = resolve_train_config("cpu", "scratch", {"image_size": str(args.size), "batch_size": str(args.batch_size)})
    rt = choose_runtime(cfg)
    torch.manual_seed(0)
    x = torch.rand(args.images, 1, args.size, args.size)
    y = torch.arange(args.images) % 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, device {rt.device}, "
          f"precision {rt.precision}, channels_last {rt.channels_last}; {args.images} images at {args.size} px, "
          f"batch {args.batch_size}, best of {args.repeats}")
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: the machine is shared, figures "
              "are noisy")

    load_before = os.getloadavg()[0]
    best = {"pipeline": 0.0, "bare": 0.0, "tutorial": 0.0, "tutorial+": 0.0}
    for repeat in range(args.repeats):
        best["pipeline"] = max(best["pipeline"], pipeline_loop(x, y, cfg, rt, args.warmup_steps))
        best["bare"] = max(best["bare"], bare_loop(x, y, cfg, rt, args.warmup_steps))
        if not args.skip_tutorial:
            best["tutorial"] = max(best["tutorial"], tutorial_loop(x, y, cfg, args.workers, args.warmup_steps))
            best["tutorial+"] = max(best["tutorial+"], tutorial_loop(x, y, cfg, args.workers, args.warmup_steps, rt))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in best.items() if v))

    flops = 3 * forward_flops_per_image(args.size)
    peak, peak_source = measured_peak(args.size, rt.precision)
    print()
    print(f"pipeline (augmentation on)   {best['pipeline']:7.1f} img/s")
    print(f"bare loop (same precision)   {best['bare']:7.1f} img/s   pipeline / bare     = "
          f"{best['pipeline'] / best['bare']:.2f}x (target >= 0.95)")
    if best["tutorial"]:
        print(f"MONAI-tutorial style (fp32)  {best['tutorial']:7.1f} img/s   pipeline / tutorial = "
              f"{best['pipeline'] / best['tutorial']:.2f}x (target >= 2)")
        plus = f"{rt.precision}{' + channels-last' if rt.channels_last else ''}"
        print(f"MONAI-tutorial style ({plus}) {best['tutorial+']:7.1f} img/s   pipeline / tutorial+ = "
              f"{best['pipeline'] / best['tutorial+']:.2f}x")
    achieved = flops * best["pipeline"]
    print(f"model FLOPs: {flops / 1e9:.2f} GFLOP per training image (3 x forward); achieved {achieved / 1e9:.1f} "
          "GFLOP/s; "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); MFU {achieved / peak:.1%}")
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
