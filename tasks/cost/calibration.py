"""This machine measured once: a matrix-product rate (taken as peak) and a few real ResNet-50 training steps.

The result is cached by torch version, CPU, threads, size, channels and precision (tasks.cost.caches), with the
load average and the spread of its timed steps beside it. A cached figure is checked before it is used: a short
probe (two warm-up and two timed steps at the calibration's batch) re-measures the training rate, and when the
two disagree by more than PROBE_TOLERANCE the machine is calibrated again and the cache replaced, so a
calibration taken while other work loaded the machine does not poison every later prediction. A comparison's
first training epoch checks it once more (tasks.cost.first_epoch), and drops it from the cache when they disagree.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from data_schemas.cost import Calibration, CalibrationCache
from data_schemas.files import read_model_json, sha256_json, write_model_json
from tasks.common.environment import cpu_name, utc_now
from tasks.common.runtime import uses_channels_last
from tasks.cost.caches import calibration_cache_path
from tasks.cost.catalogue import this_machine_precision
from tasks.cost.flops import count_phase, phase_model

CALIBRATION_STEP_FLOPS = 1.2e11  # calibration batch = this / train FLOPs per image: about a second per step
PROBE_TOLERANCE = 0.20  # a cached rate further than this from the probe's is measured again
PROBE_TIMED_STEPS = 2


def _calibration_key(image_size: int, channels: int, precision: str) -> tuple[str, dict]:
    """The key a calibration is cached under, and the fields it hashes (what makes a calibration reusable)."""
    import torch

    fields = {
        "torch_version": torch.__version__,
        "cpu_model": cpu_name(),
        "threads": torch.get_num_threads(),
        "image_size": image_size,
        "channels": channels,
        "precision": precision,
        # timed in the memory format training takes by default at this precision: fp32 training on a CPU runs
        # contiguous, about 15% slower than channels-last on this project's 2-core machine
        "channels_last": uses_channels_last("auto", "cpu", precision),
    }
    return sha256_json(fields), fields


def _matmul_rate(dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of n x n matrix products (2 n^3 FLOPs each), best of short repeats: this CPU's practical peak."""
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start))
    return best


@dataclass(frozen=True)
class StepTimes:
    """Timed ResNet-50 training steps of a calibration.

    Args:
        first_step_seconds: the first step (oneDNN builds its kernels, memory is allocated).
        steps: timed steps after the two warm-up steps.
        timed_seconds: their total wall time.
        step_seconds: each timed step's wall time.
    """

    first_step_seconds: float
    steps: int
    timed_seconds: float
    step_seconds: tuple[float, ...] = ()

    @property
    def spread(self) -> float | None:
        """(slowest - fastest) / mean of the timed steps; None without two of them."""
        times = self.step_seconds
        return (max(times) - min(times)) / (sum(times) / len(times)) if len(times) >= 2 else None


def load_average() -> float | None:
    """The 1-minute load average, where the system reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _time_training_steps(
    image_size: int, channels: int, *, batch: int, autocast_on: bool, channels_last: bool, deadline: float,
    min_timed_s: float, min_steps: int = 3,
) -> StepTimes:
    """Two warm-up steps, then timed steps until at least `min_steps` steps and `min_timed_s` are done or `deadline`
    passes.

    A step is what training does: its memory format, bf16 autocast when on, Adam, cross-entropy, on the arms'
    ResNet-50.
    """
    import torch
    from torch import nn

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = phase_model("full", channels).to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, channels, image_size, image_size).to(memory_format=memory_format)
    y = torch.arange(batch) % 2

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    first = step()
    step()
    times: list[float] = []
    while (len(times) < min_steps or sum(times) < min_timed_s) and (not times or time.perf_counter() < deadline):
        times.append(step())
    return StepTimes(first_step_seconds=first, steps=len(times), timed_seconds=sum(times), step_seconds=tuple(times))


def calibrate_this_machine(
    image_size: int,
    channels: int,
    requested_precision: str = "bf16",
    batch_size: int = 32,
    *,
    time_budget_s: float = 15.0,
    min_timed_s: float = 4.0,
) -> Calibration:
    """Measure this machine: a matrix-product rate (taken as peak) and a few real ResNet-50 training steps.

        batch              = min(batch_size, 1.2e11 / train FLOPs per image): about a second per step
        images/s           = timed steps x batch / timed seconds (the mean, not the best step: wall time on a
                             shared machine includes its stalls)
        achieved FLOP/s    = images/s x train FLOPs per image (count_phase "full")
        peak               = max(matmul rate, achieved) (a loaded machine can make the short probe look slower)
        utilisation        = achieved / peak, so FLOPs / (peak x utilisation) reproduces the measured throughput
        warm-up seconds    = first step - mean timed step: paid once per training run (kernel selection, allocation)
    """
    import torch

    started, load = time.perf_counter(), load_average()
    precision = this_machine_precision(requested_precision)
    key, fields = _calibration_key(image_size, channels, precision)
    autocast_on = precision == "bf16"
    peak = _matmul_rate(torch.bfloat16 if autocast_on else torch.float32)
    flops_per_image = count_phase("full", image_size, channels, 2).train_flops_per_image
    batch = int(max(2, min(batch_size, CALIBRATION_STEP_FLOPS // flops_per_image)))
    times = _time_training_steps(
        image_size, channels, batch=batch, autocast_on=autocast_on, channels_last=fields["channels_last"],
        deadline=started + time_budget_s, min_timed_s=min_timed_s,
    )
    images_per_second = times.steps * batch / times.timed_seconds
    achieved = images_per_second * flops_per_image
    peak = max(peak, achieved)
    return Calibration(
        key=key,
        **fields,
        matmul_flops_per_second=peak,
        train_batch_size=batch,
        train_steps=times.steps,
        train_images_per_second=images_per_second,
        train_flops_per_image=flops_per_image,
        train_flops_per_second=achieved,
        utilisation=achieved / peak,
        warmup_seconds=max(0.0, times.first_step_seconds - times.timed_seconds / times.steps),
        seconds_taken=time.perf_counter() - started,
        measured_at=utc_now(),
        load_average=load,
        cpus=os.cpu_count(),
        step_spread=times.spread,
    )


def probe_images_per_second(calibration: Calibration) -> float:
    """This machine's training rate now, at a calibration's size, channels, precision and batch: two warm-up steps,
    then PROBE_TIMED_STEPS timed ones (a few seconds)."""
    times = _time_training_steps(
        calibration.image_size, calibration.channels, batch=calibration.train_batch_size,
        autocast_on=calibration.precision == "bf16", channels_last=calibration.timed_channels_last,
        deadline=math.inf, min_timed_s=0.0, min_steps=PROBE_TIMED_STEPS,
    )
    return times.steps * calibration.train_batch_size / times.timed_seconds


def describe_calibration(calibration: Calibration) -> str:
    """Which calibration, in words: when it was measured, its rate, and how loaded and steady the machine was."""
    load = f"load {calibration.load_average:.1f} on {calibration.cpus} CPUs" if calibration.load_average is not None \
        else "load not recorded"
    spread = (f", step spread {calibration.step_spread:.0%}" if calibration.step_spread is not None
              else ", step spread not measured (fewer than two timed steps)")
    return (f"the calibration measured {calibration.measured_at} ({calibration.train_images_per_second:.1f} training "
            f"images/s at {calibration.image_size} px, {load}{spread})")


def load_or_calibrate(
    image_size: int,
    channels: int,
    requested_precision: str = "bf16",
    batch_size: int = 32,
    *,
    cache_path: Path | None = None,
    refresh: bool = False,
) -> Calibration:
    """The cached calibration for (torch version, CPU model, threads, size, channels, precision), else a new one."""
    cache_path = Path(cache_path or calibration_cache_path())
    key, _ = _calibration_key(image_size, channels, this_machine_precision(requested_precision))
    cache = CalibrationCache()
    if cache_path.is_file():
        try:
            cache = read_model_json(cache_path, CalibrationCache)
        except Exception:  # a corrupt cache is re-measured, never fatal
            cache = CalibrationCache()
    if not refresh and key in cache.entries:
        return cache.entries[key]
    calibration = calibrate_this_machine(image_size, channels, requested_precision, batch_size)
    cache.entries[key] = calibration
    write_model_json(cache_path, cache)
    return calibration


def forget_calibration(calibration: Calibration, *, cache_path: Path | None = None) -> bool:
    """Drop `calibration` from the cache, so the next cost stage measures this machine again; False when the cache
    no longer holds it (another measurement replaced it meanwhile, or it was never cached)."""
    cache_path = Path(cache_path or calibration_cache_path())
    try:
        cache = read_model_json(cache_path, CalibrationCache)
    except Exception:  # noqa: BLE001 - no cache, or a corrupt one (re-measured anyway): nothing to drop
        return False
    cached = cache.entries.get(calibration.key)
    if cached is None or cached.measured_at != calibration.measured_at:
        return False
    del cache.entries[calibration.key]
    write_model_json(cache_path, cache)
    return True


def checked_calibration(
    image_size: int, channels: int, requested_precision: str = "bf16", batch_size: int = 32, *,
    cache_path: Path | None = None,
) -> tuple[Calibration, str]:
    """load_or_calibrate, with a cached figure checked by a short probe first (module doc) and measured again when
    they disagree by more than PROBE_TOLERANCE; returns the calibration and a sentence saying which one it is."""
    cache_path = Path(cache_path or calibration_cache_path())
    key, _ = _calibration_key(image_size, channels, this_machine_precision(requested_precision))
    cached = None
    if cache_path.is_file():
        try:
            cached = read_model_json(cache_path, CalibrationCache).entries.get(key)
        except Exception:  # a corrupt cache is re-measured, never fatal
            cached = None
    if cached is None:
        calibration = load_or_calibrate(image_size, channels, requested_precision, batch_size, cache_path=cache_path)
        return calibration, f"Calibrated this machine now: {describe_calibration(calibration)}."
    probe, load = probe_images_per_second(cached), load_average()
    disagreement = abs(probe / cached.train_images_per_second - 1.0)
    now = f"{probe:.1f} images/s" + (f" at load {load:.1f}" if load is not None else "")
    if disagreement <= PROBE_TOLERANCE:
        return cached, (f"Using {describe_calibration(cached)}; a short probe now agrees within {disagreement:.0%} "
                        f"({now}).")
    calibration = load_or_calibrate(image_size, channels, requested_precision, batch_size, cache_path=cache_path,
                                    refresh=True)
    return calibration, (f"Re-calibrated: {describe_calibration(cached)} disagreed by {disagreement:.0%} with a short "
                         f"probe ({now}); now using {describe_calibration(calibration)}.")
