"""Compute-cost estimate of each training arm: FLOPs counted on the real model, memory measured, time per device.

The classic back-of-envelope ("ResNet-50 on ImageNet took ~14 days on one M40, ~10^18 operations; a dataset
10,000x smaller costs 10,000x less per epoch; grayscale makes conv1 3x cheaper; cost scales with pixel count") is
done here from the actual model and dataset:

    forward FLOPs per image   counted by tasks.training.models.count_flops (FlopCounterMode) on each arm's own model
                              (tasks.training.models.build_model: ResNet-50, ResNet-18 or MobileNetV3-Large, the arm's
                              ArmSpec.model) at the configured size and channel count, on the meta device: shapes
                              only, no arithmetic is done.
    training FLOPs per image  counted the same way over a real forward + backward with the arm's freezing applied,
                              so a frozen layer contributes no weight gradient and a frozen prefix no backward at
                              all. For full backprop this is 3 x forward - conv1 (forward F, input gradients F
                              except conv1's, whose input needs none, weight gradients F: Kaplan et al. 2020,
                              "Scaling Laws", C ~ 6N per token = 3 x 2N).
    time                      FLOPs / (peak FLOP/s at the precision x utilisation) + overhead, nanoGPT
                              estimate_mfu inverted, with peak and utilisation per device from
                              data_schemas/devices.json; for this machine both, and the overhead, come from a short
                              calibration (of ResNet-50 training: other models are priced at ResNet-50's share of
                              peak, an assumption the report's notes state).

FLOP convention: FlopCounterMode counts 2 FLOPs per multiply-add (MAC). ResNet-50 at 224 x 224 x 3 is ~4.1 G MAC =
~8.2 GFLOPs forward. The "10^18 single-precision operations" for 90 ImageNet epochs in You et al. 2018 ("ImageNet
Training in Minutes") is in MACs: 1.28e6 images x 90 epochs x 3 (fwd+bwd) x 4.1e9 MAC ~ 1.4e18 MAC ~ 2.8e18 FLOPs.
At the M40's 7 TFLOP/s FP32 peak and the catalogue's 35% utilisation: 2.8e18 / (7e12 x 0.35) ~ 1.15e6 s ~ 13 days,
i.e. the quoted "14 days" (tests/test_cost.py checks it).

Estimate vs actual: one path. cost.json holds estimates only. Each training run already writes what it really
took (wall time, epochs run, images seen) to its own timing.json, which is where the numbers are measured; the
evaluation stage reads it and asks estimated_seconds_for for the estimate of the epochs actually run. A second
copy of the actuals written back into cost.json (the former record_actual) was never called by training, could
only drift from timing.json, and needed a file shared by concurrently training arms: it was removed.

Layering: plain typed functions first, thin Prefect @task wrappers at the end. The tables that present a
CostReport live in reports/cost_tables.py.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from importlib import resources
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from data_schemas.arms import LEGACY_MODEL, ArmSpec, default_arms, parse_arm, parse_arms
from data_schemas.cost import (
    COST_FILE,
    COST_SCHEMA_VERSION,
    THIS_MACHINE,
    ArmCost,
    Calibration,
    CalibrationCache,
    CostInputs,
    CostReport,
    DeviceCatalogue,
    DeviceEstimate,
    DeviceRate,
    DeviceSpec,
    MemoryEstimate,
    ModelCountsCache,
    PhaseCounts,
    PlannedRunWork,
    Precision,
    StageTime,
    WallTimeEstimate,
    WallTimePlan,
)
from data_schemas.files import read_model_json, sha256_file, sha256_json, write_model_json
from data_schemas.plan import RunEnvironment, RunPlan

FEATURE_DIM = 2048  # ResNet-50's pooled feature width
MEMORY_USABLE_FRACTION = 0.9  # leave 10% of device memory for the framework, kernels' workspace and fragmentation
ACTIVATION_MEASURE_MAX_SIZE = 320  # above this, activations are measured at 320 px and scaled by pixel count
CALIBRATION_STEP_FLOPS = 1.2e11  # calibration batch = this / train FLOPs per image: about a second per step

FLOP_CONVENTION = (
    "FLOPs as counted by torch.utils.flop_counter.FlopCounterMode: 2 per multiply-add "
    "(ResNet-50 at 224x224x3 = ~4.1 G multiply-adds = ~8.2 GFLOPs forward). Vendor TFLOPS use the same convention. "
    "Literature 'operations' for ImageNet (~1e18 for 90 epochs, You et al. 2018) are multiply-adds: x2 to compare."
)

# Precisions tried in order when a device lacks the requested one (bf16 -> fp16 tensor cores -> fp32).
_PRECISION_FALLBACK: dict[str, tuple[str, ...]] = {
    "fp32": ("fp32",),
    "tf32": ("tf32", "fp32"),
    "fp16": ("fp16", "bf16", "fp32"),
    "bf16": ("bf16", "fp16", "fp32"),
}
PHASES = ("full", "head", "features")


# ============================================================================================ the model


def phase_model(phase: str, channels: int, num_classes: int = 2, device: str = "cpu", model: str = LEGACY_MODEL):
    """The arm's `model` (tasks.training.models.build_model, random weights) set up for one training phase.

    phase: "full" every parameter trainable (scratch, imagenet fine-tuning);
           "head" only the classifier head trainable (imagenet head-only warm-up epochs, as training freezes it);
           "features" frozen backbone in eval mode, fc replaced by Identity (imagenet-linear feature extraction).
    """
    import torch

    from tasks.training.models import as_feature_extractor, build_model, is_head_parameter

    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; use {', '.join(PHASES)}")
    with torch.device(device):
        net = build_model(model, num_classes=num_classes, in_channels=channels).train()
    if phase == "features":
        return as_feature_extractor(net)
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(phase == "full" or is_head_parameter(name, model))
    return net


# ============================================================================================ counting FLOPs


def model_counts_cache_path() -> Path:
    """model_counts.json beside calibration.json (calibration_cache_path)."""
    return calibration_cache_path().parent / "model_counts.json"


@functools.lru_cache(maxsize=1)
def _counting_code_version() -> str:
    """What counts depend on besides their arguments: torch's and torchvision's versions and the code that builds
    and counts the models (this module, tasks/training/models.py, data_schemas/arms.py). A change to any re-counts."""
    import data_schemas.arms
    import tasks.training.models

    sources = (__file__, tasks.training.models.__file__, data_schemas.arms.__file__)
    return sha256_json({
        "torch": metadata.version("torch"), "torchvision": metadata.version("torchvision"),
        "code": [sha256_file(Path(path)) for path in sources],
    })


def _read_model_counts() -> ModelCountsCache:
    try:
        return read_model_json(model_counts_cache_path(), ModelCountsCache)
    except Exception:  # missing or corrupt: counted again, never fatal
        return ModelCountsCache()


def _remember_model_counts(update: Callable[[ModelCountsCache], None]) -> None:
    """Add an entry to model_counts.json (read again first: another process may have added some meanwhile)."""
    cache = _read_model_counts()
    update(cache)
    try:
        write_model_json(model_counts_cache_path(), cache)
    except OSError:  # a read-only working folder: the estimate is still right, only not cached
        pass


@functools.lru_cache(maxsize=128)
def count_phase(phase: str, image_size: int, channels: int, num_classes: int = 2, model: str = LEGACY_MODEL) -> PhaseCounts:
    """FLOPs and parameter counts of one phase of `model`, counted on the meta device (tasks.training.models.count_flops);
    kept in model_counts.json, so that a later estimate needs no model built.

    full: train = 3 x forward - stem conv (every weight gradient, every input gradient but the first conv's);
    head: train = forward + 2 x D x classes (the head's weight gradient only; nothing below it needs a gradient),
          D = the pooled feature width (tasks.training.models.feature_dim: ResNet-50 2048);
    features: no backward, head removed: forward = full forward - 2 x D x classes.
    """
    key = sha256_json({"phase": phase, "size": image_size, "channels": channels, "classes": num_classes, "model": model,
                       "code": _counting_code_version()})
    cached = _read_model_counts().phase_counts.get(key)
    if cached is not None:
        return cached
    from tasks.training.models import count_flops, feature_dim

    net = phase_model(phase, channels, num_classes, device="meta", model=model)
    counts = PhaseCounts(
        phase=phase,
        feature_dim=feature_dim(model),
        forward_flops_per_image=count_flops(net, image_size, channels),
        train_flops_per_image=count_flops(net, image_size, channels, backward=True),
        params_total=sum(p.numel() for p in net.parameters()),
        params_trainable=sum(p.numel() for p in net.parameters() if p.requires_grad),
        buffers=sum(b.numel() for b in net.buffers()),
    )
    _remember_model_counts(lambda cache: cache.phase_counts.__setitem__(key, counts))
    return counts


def linear_fit_flops(n_images: int, num_classes: int = 2, iterations: int = 100, dim: int = FEATURE_DIM) -> float:
    """FLOPs of fitting logistic regression on the extracted features (imagenet-linear arm).

    iterations x (2 n d c for the logits X.W  +  2 n d c for the gradient X^T.R) = 4 n d c per L-BFGS iteration,
    with c = 1 weight vector for two classes, num_classes otherwise; line-search re-evaluations are ignored. For
    1,500 images that is ~1.2 GFLOPs per 100 iterations: negligible next to the feature pass (~12 TFLOPs).
    """
    c = 1 if num_classes == 2 else num_classes
    return float(iterations) * 4.0 * n_images * dim * c


def classifier_params(num_classes: int = 2, dim: int = FEATURE_DIM) -> int:
    """Parameters of the logistic regression on `dim` features: d x c + c, one vector (c = 1) for two classes."""
    c = 1 if num_classes == 2 else num_classes
    return dim * c + c


def training_flops(
    *, n_images: int, epochs: int, train_per_image: float, head_warmup_epochs: int = 0, head_per_image: float = 0.0
) -> float:
    """FLOPs of `epochs` training epochs, the first `head_warmup_epochs` of them head-only:

        min(epochs, w) x n x head_per_image + max(0, epochs - w) x n x train_per_image

    Used for the planned run (epochs = the configured epochs) and for the epochs a run actually ran.
    """
    head_epochs = min(epochs, head_warmup_epochs)
    return head_epochs * n_images * head_per_image + (epochs - head_epochs) * n_images * train_per_image


def arm_flops_for_epochs(arm: ArmCost, epochs: int) -> float:
    """FLOPs of `arm` after `epochs` epochs (training_flops); the linear arm is one pass: flops_total whatever
    `epochs` is."""
    if parse_arm(arm.arm).mode == "imagenet-linear":
        return arm.flops_total
    return training_flops(
        n_images=arm.n_images,
        epochs=epochs,
        train_per_image=arm.train_flops_per_image,
        head_warmup_epochs=arm.head_warmup_epochs,
        head_per_image=arm.head_phase_flops_per_image or 0.0,
    )


# ============================================================================================ memory


def _autocast_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision in ("bf16", "fp16") else None


def _storage_key(tensor) -> int:
    return tensor.untyped_storage()._cdata


def _saved_tensor_bytes(model, x, precision: str) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward (parameters excluded)."""
    import torch

    param_keys = {_storage_key(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        key = _storage_key(tensor)
        if key not in param_keys:
            seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    dtype = _autocast_dtype(precision)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    return sum(seen.values())


def _nbytes(obj) -> int:
    """Bytes of a tensor, or of the tensors in a tuple/list (0 for anything else)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def _is_residual_block(module) -> bool:
    """A block whose input stays alive for a skip connection: ResNet's blocks, MobileNetV3's residual ones."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return isinstance(module, (BasicBlock, Bottleneck)) or (
        isinstance(module, InvertedResidual) and module.use_res_connect
    )


def _inference_peak_bytes(model, x, precision: str) -> int:
    """Approximate live activation bytes of a no-grad forward: max over leaf modules of input + output, plus the
    largest residual-block input (kept alive for the skip connection)."""
    import torch

    peaks = {"leaf": 0, "block": 0}

    def leaf_hook(_module, inputs, output):
        peaks["leaf"] = max(peaks["leaf"], _nbytes(inputs) + _nbytes(output))

    def block_hook(_module, inputs, _output):
        peaks["block"] = max(peaks["block"], _nbytes(inputs))

    handles = []
    for module in model.modules():
        if len(list(module.children())) == 0:
            handles.append(module.register_forward_hook(leaf_hook))
        elif _is_residual_block(module):
            handles.append(module.register_forward_hook(block_hook))
    dtype = _autocast_dtype(precision)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return peaks["leaf"] + peaks["block"]


@functools.lru_cache(maxsize=128)
def measure_activation_memory(
    phase: str, image_size: int, channels: int, precision: str, num_classes: int = 2, model: str = LEGACY_MODEL
) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of activations for one phase of `model`, measured on this CPU.

    Training phases: the distinct tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
    at the precision's autocast (bf16/fp16 -> CPU bf16 autocast, which keeps some fp32 copies: measured, not
    assumed halved), parameters excluded. For ResNet-50 in fp32 this is, per image, 4 bytes x (the input + every
    conv output,
    which BatchNorm saves + every ReLU output + the max-pool output + the 2048 pooled features) + 8 bytes x the
    max-pool indices. Measured at batch 2 and 4: per image = (b4 - b2) / 2; fixed = the batch-independent rest
    (BatchNorm running statistics, autocast's low-precision weight copies). The feature phase has no backward:
    the approximate peak of live tensors of a no-grad forward (see _inference_peak_bytes). Above
    ACTIVATION_MEASURE_MAX_SIZE px it is measured there and scaled by pixel count (activations are per pixel).
    Kept in model_counts.json by its arguments and this CPU (autocast's kernels differ between CPUs).
    """
    key = sha256_json({"phase": phase, "size": image_size, "channels": channels, "precision": precision,
                       "classes": num_classes, "model": model, "cpu": cpu_model(), "code": _counting_code_version()})
    cached = _read_model_counts().activation_bytes.get(key)
    if cached is not None:
        return cached
    import torch

    measure_size = min(image_size, ACTIVATION_MEASURE_MAX_SIZE)
    scale = (image_size / measure_size) ** 2
    net = phase_model(phase, channels, num_classes, model=model).to(memory_format=torch.channels_last)
    measure = _inference_peak_bytes if phase == "features" else _saved_tensor_bytes
    results = []
    for batch in (2, 4):
        x = torch.zeros(batch, channels, measure_size, measure_size).to(memory_format=torch.channels_last)
        results.append(measure(net, x, precision))
    per_image = max(0, (results[1] - results[0]) // 2)
    fixed = max(0, results[0] - 2 * per_image)
    measured = (fixed, int(per_image * scale))
    _remember_model_counts(lambda cache: cache.activation_bytes.__setitem__(key, measured))
    return measured


def optimizer_state_bytes(trainable_params: int, optimizer: str) -> int:
    """bytes = trainable x 8 for Adam (two fp32 moments: torch.optim.Adam's exp_avg and exp_avg_sq) or x 4 for SGD
    with momentum (one fp32 momentum_buffer)."""
    per_param = {"adam": 8, "sgd": 4}[optimizer]
    return trainable_params * per_param


def max_batch_size(memory_bytes: float, fixed_bytes: int, per_image_bytes: int, cap: int = 65_536) -> int:
    """floor((0.9 x memory - fixed) / per image), capped at `cap`; 0 when not even one image fits."""
    usable = memory_bytes * MEMORY_USABLE_FRACTION - fixed_bytes
    if usable < per_image_bytes:
        return 0
    if per_image_bytes <= 0:
        return cap
    return int(min(cap, usable // per_image_bytes))


def memory_estimate(
    counts: PhaseCounts, *, trainable: int, optimizer: str, activations: tuple[int, int], batch: int, method: str
) -> MemoryEstimate:
    """Training memory on the device:

        weights 4 B x (params + buffers) + gradients 4 B x trainable + optimizer state (Adam 8 B, SGD 4 B) x trainable
        + activations (fixed + batch x per image, measured by measure_activation_memory)
    """
    fixed, per_image = activations
    weights = 4 * (counts.params_total + counts.buffers)
    gradients = 4 * trainable
    state = optimizer_state_bytes(trainable, optimizer)
    activation_bytes = fixed + batch * per_image
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_bytes=state,
        activations_bytes_per_image=per_image,
        activations_fixed_bytes=fixed,
        activations_bytes=activation_bytes,
        total_bytes=weights + gradients + state + activation_bytes,
        method=method,
    )


# ============================================================================================ devices and time


def default_catalogue_path() -> Path:
    """data_schemas/devices.json, the catalogue shipped with the package."""
    return Path(str(resources.files("data_schemas").joinpath("devices.json")))


def load_catalogue(path: Path | None = None) -> DeviceCatalogue:
    """Read and validate the device catalogue; a broken entry raises ValueError naming the file and the problem."""
    from pydantic import ValidationError

    path = Path(path or default_catalogue_path())
    try:
        return read_model_json(path, DeviceCatalogue)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in error.errors(include_url=False)
        )
        raise ValueError(f"device catalogue {path} is invalid: {problems}") from None


def resolve_precision(device: DeviceSpec, requested: str) -> str:
    """The precision a device runs a `requested` job at: bf16 -> fp16 tensor cores -> fp32; tf32 -> fp32."""
    for precision in _PRECISION_FALLBACK[requested]:
        if precision in device.rates:
            return precision
    return "fp32"


def estimate_seconds(flops: float, device: DeviceSpec, precision: str) -> float:
    """seconds = FLOPs / (peak FLOP/s at the resolved precision x utilisation)  (nanoGPT estimate_mfu, inverted)."""
    rate = device.rates[resolve_precision(device, precision)]
    return flops / rate.effective_flops_per_second


def cpu_model() -> str:
    """This CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    """This machine's RAM: the memory this-machine trains in."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_machine_precision(requested: str) -> str:
    """bf16/fp16 requests run as bf16 autocast when the CPU supports it (tasks.common.runtime), else fp32; no CPU tf32."""
    from tasks.common.runtime import cpu_has_fast_bf16

    return "bf16" if requested in ("bf16", "fp16") and cpu_has_fast_bf16() else "fp32"


# ============================================================================================ calibration


def calibration_cache_path() -> Path:
    """$CTCOMPARE_CACHE_DIR/calibration.json, else .ctcompare/calibration.json in the working folder."""
    base = os.environ.get("CTCOMPARE_CACHE_DIR")
    return (Path(base) if base else Path.cwd() / ".ctcompare") / "calibration.json"


def _calibration_key(image_size: int, channels: int, precision: str) -> tuple[str, dict]:
    """The key a calibration is cached under, and the fields it hashes (what makes a calibration reusable)."""
    import torch

    fields = {
        "torch_version": torch.__version__,
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "image_size": image_size,
        "channels": channels,
        "precision": precision,
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
    """

    first_step_seconds: float
    steps: int
    timed_seconds: float


def _time_training_steps(
    image_size: int, channels: int, *, batch: int, autocast_on: bool, deadline: float, min_timed_s: float
) -> StepTimes:
    """Two warm-up steps, then timed steps until at least 3 steps and `min_timed_s` are done or `deadline` passes.

    A step is what training does: channels_last, bf16 autocast when on, Adam, cross-entropy, on the arms' ResNet-50.
    """
    import torch
    from torch import nn

    model = phase_model("full", channels).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, channels, image_size, image_size).to(memory_format=torch.channels_last)
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
    steps, timed = 0, 0.0
    while (steps < 3 or timed < min_timed_s) and (steps == 0 or time.perf_counter() < deadline):
        timed += step()
        steps += 1
    return StepTimes(first_step_seconds=first, steps=steps, timed_seconds=timed)


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

    started = time.perf_counter()
    precision = this_machine_precision(requested_precision)
    key, fields = _calibration_key(image_size, channels, precision)
    autocast_on = precision == "bf16"
    peak = _matmul_rate(torch.bfloat16 if autocast_on else torch.float32)
    flops_per_image = count_phase("full", image_size, channels, 2).train_flops_per_image
    batch = int(max(2, min(batch_size, CALIBRATION_STEP_FLOPS // flops_per_image)))
    times = _time_training_steps(
        image_size, channels, batch=batch, autocast_on=autocast_on, deadline=started + time_budget_s,
        min_timed_s=min_timed_s,
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
        measured_at=_now(),
    )


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


def price_this_machine(catalogue: DeviceCatalogue, calibration: Calibration | None) -> DeviceCatalogue:
    """Catalogue with this-machine's memory set to its RAM, bf16 dropped if unsupported, and the calibration applied.

    With a calibration, this-machine's rate at the calibrated precision becomes peak = the matmul rate and
    utilisation = achieved training FLOP/s / peak, so that its effective rate is the measured training rate.
    """
    from tasks.common.runtime import cpu_has_fast_bf16

    devices = []
    for device in catalogue.devices:
        if device.name == THIS_MACHINE:
            rates = dict(device.rates)
            source = device.source
            if not cpu_has_fast_bf16():
                rates.pop("bf16", None)
                rates.pop("fp16", None)
            if calibration is not None:
                rates[calibration.precision] = DeviceRate(
                    peak_tflops=calibration.matmul_flops_per_second / 1e12,
                    utilisation=min(1.0, calibration.utilisation),
                )
                source = (
                    f"calibrated {calibration.measured_at}: {calibration.precision} matmul "
                    f"{calibration.matmul_flops_per_second / 1e9:.0f} GFLOP/s, ResNet-50 training "
                    f"{calibration.train_images_per_second:.1f} img/s at {calibration.image_size} px "
                    f"({calibration.cpu_model}, {calibration.threads} threads)"
                )
            device = device.model_copy(update={"rates": rates, "memory_gb": ram_bytes() / 1e9, "source": source})
        devices.append(device)
    return catalogue.model_copy(update={"devices": devices})


# ============================================================================================ the estimate


def _linear_arm_work(spec: ArmSpec, inputs: CostInputs) -> dict[str, Any]:
    """ArmCost's FLOP fields for an imagenet-linear arm: n x forward(backbone, no grad) + linear_fit_flops(n, D);
    one pass, D = the model's pooled feature width."""
    counts = count_phase("features", inputs.image_size, inputs.channels, inputs.num_classes, spec.model)
    dim = counts.feature_dim
    fit = linear_fit_flops(inputs.n_images, inputs.num_classes, inputs.linear_fit_iterations, dim)
    per_epoch = inputs.n_images * counts.forward_flops_per_image
    return {
        "params_total": counts.params_total + classifier_params(inputs.num_classes, dim),
        "params_trainable": classifier_params(inputs.num_classes, dim),
        "forward_flops_per_image": counts.forward_flops_per_image,
        "train_flops_per_image": counts.forward_flops_per_image,
        "classifier_fit_flops": fit,
        "flops_per_epoch": per_epoch,
        "flops_total": per_epoch + fit,
        "epochs_effective": 1,
        "formulas": [
            "flops_total = n_images x forward_flops_per_image (one no-grad feature pass) + classifier_fit_flops",
            f"classifier_fit_flops = iterations ({inputs.linear_fit_iterations}) x 4 x n x {dim} x classes(1 if binary)",
        ],
    }


def _trained_arm_work(spec: ArmSpec, inputs: CostInputs) -> dict[str, Any]:
    """ArmCost's FLOP fields for scratch and imagenet arms (training_flops; imagenet's warm-up epochs are head-only)."""
    counts = count_phase("full", inputs.image_size, inputs.channels, inputs.num_classes, spec.model)
    warmup = inputs.head_warmup_epochs if spec.mode == "imagenet" else 0
    head = count_phase("head", inputs.image_size, inputs.channels, inputs.num_classes, spec.model) if warmup else None
    head_per_image = head.train_flops_per_image if head else None
    total = training_flops(
        n_images=inputs.n_images, epochs=inputs.epochs, train_per_image=counts.train_flops_per_image,
        head_warmup_epochs=warmup, head_per_image=head_per_image or 0.0,
    )
    formulas = ["flops_total = warmup x n x head_phase_flops_per_image + (epochs - warmup) x flops_per_epoch"
                if warmup else "flops_total = epochs x flops_per_epoch"]
    formulas.append("flops_per_epoch = n_images x train_flops_per_image (counted forward + backward, ~3x forward)")
    return {
        "params_total": counts.params_total,
        "params_trainable": counts.params_trainable,
        "forward_flops_per_image": counts.forward_flops_per_image,
        "train_flops_per_image": counts.train_flops_per_image,
        "head_warmup_epochs": warmup,
        "head_phase_flops_per_image": head_per_image,
        "flops_per_epoch": inputs.n_images * counts.train_flops_per_image,
        "flops_total": total,
        "epochs_effective": inputs.epochs,
        "formulas": formulas,
    }


def _arm_memory(spec: ArmSpec, inputs: CostInputs) -> MemoryEstimate:
    """memory_estimate of the arm's heaviest phase: full training, or the frozen feature pass (no gradients, no
    optimizer state) for imagenet-linear."""
    phase = "features" if spec.mode == "imagenet-linear" else "full"
    counts = count_phase(phase, inputs.image_size, inputs.channels, inputs.num_classes, spec.model)
    activations = measure_activation_memory(
        phase, inputs.image_size, inputs.channels, inputs.precision, inputs.num_classes, spec.model
    )
    autocast = "bf16 autocast" if inputs.precision in ("bf16", "fp16") else "fp32"
    method = (
        "no-grad forward: peak of live tensors (max leaf input+output plus the residual input), measured on CPU"
        if phase == "features"
        else f"tensors saved for backward (saved_tensors_hooks), measured on CPU at batch 2 and 4 under {autocast}"
    )
    return memory_estimate(
        counts, trainable=counts.params_trainable, optimizer=inputs.optimizer, activations=activations,
        batch=inputs.batch_size, method=method,
    )


def _device_estimate(
    device: DeviceSpec, work: dict[str, Any], memory: MemoryEstimate, inputs: CostInputs, overhead: float
) -> DeviceEstimate:
    """One arm on one device:

        seconds   = flops_total / (peak FLOP/s at the resolved precision x utilisation) + overhead
        max_batch = floor((0.9 x device memory - weights - gradients - optimizer - fixed activations) / per image)
    """
    precision = resolve_precision(device, inputs.precision)
    rate = device.rates[precision]
    effective = rate.effective_flops_per_second
    batch = max_batch_size(device.memory_gb * 1e9, _batch_independent_bytes(memory), memory.activations_bytes_per_image)
    return DeviceEstimate(
        device=device.name,
        precision=precision,
        peak_flops_per_second=rate.peak_tflops * 1e12,
        utilisation=rate.utilisation,
        effective_flops_per_second=effective,
        seconds_per_epoch=work["flops_per_epoch"] / effective,
        overhead_seconds=overhead,
        seconds=work["flops_total"] / effective + overhead,
        max_batch_size=batch,
        batch_fits=batch >= inputs.batch_size,
    )


def _batch_independent_bytes(memory: MemoryEstimate) -> int:
    """weights + gradients + optimizer state + fixed activations: what a device holds whatever the batch."""
    return memory.weights_bytes + memory.gradients_bytes + memory.optimizer_bytes + memory.activations_fixed_bytes


def estimate_arm(
    arm: str | ArmSpec, inputs: CostInputs, catalogue: DeviceCatalogue, overheads: dict[str, float] | None = None
) -> ArmCost:
    """The full estimate of one arm (any name parse_arm accepts: its model and mode) on every catalogue device.

    scratch          total = epochs x n x train(full)
    imagenet         total = warmup x n x train(head) + (epochs - warmup) x n x train(full); a head-only epoch
                     is a forward of the whole net plus the backward of fc only (counted, not assumed)
    imagenet-linear  total = n x forward(backbone, no grad) + linear_fit_flops(n); one pass, no epochs
    seconds          = total / (peak x utilisation) + overhead; overhead = the calibrated first-step warm-up on
                     this machine (`overheads` by device name), 0 elsewhere
    """
    overheads = overheads or {}
    spec = parse_arm(arm)
    work = _linear_arm_work(spec, inputs) if spec.mode == "imagenet-linear" else _trained_arm_work(spec, inputs)
    memory = _arm_memory(spec, inputs)
    work["formulas"] += [
        "seconds = flops / (peak FLOP/s at precision x utilisation) + overhead (this machine: warm-up)",
        "max_batch = floor((0.9 x device memory - weights - gradients - optimizer - fixed) / per-image activations)",
    ]
    given = None
    if inputs.device_memory_gb is not None:
        given = max_batch_size(
            inputs.device_memory_gb * 1e9, _batch_independent_bytes(memory), memory.activations_bytes_per_image
        )
    devices = [
        _device_estimate(device, work, memory, inputs, overheads.get(device.name, 0.0)) for device in catalogue.devices
    ]
    return ArmCost(
        arm=spec.name, model=spec.model, description=spec.description, n_images=inputs.n_images, memory=memory,
        max_batch_for_given_memory=given, devices=devices, **work,
    )


def estimated_seconds_for(arm: ArmCost, device: str, epochs_run: int | None = None) -> float:
    """The estimate of `arm` on `device` for `epochs_run` epochs (None: the planned run):

        arm_flops_for_epochs(arm, epochs_run) / (peak x utilisation) + overhead

    so a run stopped early is priced for the epochs it ran, its head-only warm-up epochs at the head-only rate.
    The linear arm is one pass whatever epochs_run says. KeyError when `device` has no estimate.
    """
    for estimate in arm.devices:
        if estimate.device == device:
            if epochs_run is None:
                return estimate.seconds
            return arm_flops_for_epochs(arm, epochs_run) / estimate.effective_flops_per_second + estimate.overhead_seconds
    raise KeyError(f"arm {arm.arm!r} has no estimate for device {device!r}")


def config_hash(inputs: CostInputs, catalogue_sha256: str, calibrate: bool) -> str:
    """Identity of an estimate: inputs, catalogue content, calibration choice and schema version."""
    return sha256_json(
        {"inputs": inputs.model_dump(mode="json"), "catalogue": catalogue_sha256, "calibrate": calibrate,
         "v": COST_SCHEMA_VERSION}
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    try:
        return metadata.version("ctcompare")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def build_cost_report(
    inputs: CostInputs,
    catalogue: DeviceCatalogue | None = None,
    calibration: Calibration | None = None,
    catalogue_path: Path | None = None,
) -> CostReport:
    """Estimate every requested arm on every device (this-machine priced from `calibration` when given, with its
    warm-up as this machine's overhead)."""
    catalogue_path = Path(catalogue_path or default_catalogue_path())
    catalogue = catalogue or load_catalogue(catalogue_path)
    priced = price_this_machine(catalogue, calibration)
    overheads = {THIS_MACHINE: calibration.warmup_seconds} if calibration is not None else {}
    catalogue_sha = sha256_file(catalogue_path)
    notes = [
        "Estimates price compute only: data loading, augmentation and evaluation passes are not included.",
        "Utilisation figures for GPUs are assumptions stated in devices.json, not measurements.",
    ]
    if calibration is None:
        notes.append("this-machine uses catalogue defaults (not calibrated): expect a large error.")
    if any(parse_arm(arm).model != LEGACY_MODEL for arm in inputs.arms):
        notes.append(
            "Utilisation (this machine's calibration and the catalogue's figures) is ResNet-50's: other models are "
            "priced at the same share of peak, which likely overstates the speed of depthwise-convolution networks "
            "(MobileNetV3), whose low arithmetic intensity reaches a smaller share of peak."
        )
    return CostReport(
        created_at=_now(),
        ctcompare_version=_version(),
        config_hash=config_hash(inputs, catalogue_sha, calibration is not None),
        flop_convention=FLOP_CONVENTION,
        inputs=inputs,
        calibrated=calibration is not None,
        calibration=calibration,
        catalogue_sha256=catalogue_sha,
        devices=priced.devices,
        arms=[estimate_arm(arm, inputs, priced, overheads) for arm in inputs.arms],
        notes=notes,
    )


def existing_report(out_dir: Path, expected_hash: str) -> CostReport | None:
    """cost.json in out_dir if it exists, is valid and was made from the same config; else None."""
    path = Path(out_dir) / COST_FILE
    if not path.is_file():
        return None
    try:
        report = read_model_json(path, CostReport)
    except Exception:  # an older or damaged cost.json is recomputed, never fatal
        return None
    return report if report.config_hash == expected_hash else None


def write_cost_report(out_dir: Path, report: CostReport) -> Path:
    """Write cost.json into out_dir atomically and return its path."""
    path = Path(out_dir) / COST_FILE
    write_model_json(path, report)
    return path


# ============================================================================================ a comparison's wall time

# What the calibrated FLOP estimate leaves out, measured on this project's 2-core machine from the log timestamps of
# `ctcompare demo` runs (cpu profile, 1,500 files, 1,056 training and 220 test images at 112 px, 1,000 bootstrap
# resamples) on 2026-11-30: C without weights (scratch trained 10 epochs, pretrained arms skipped) and D with a
# weights file (scratch 10 epochs, imagenet stopped at epoch 6, imagenet-linear), each under /usr/bin/time.
# Start-up, the demo's cohort, ingest and the split are not predicted: they are over when the cost stage runs,
# so their measured time is added (WallTimePlan.elapsed_seconds).
TRAIN_WALL_FACTOR = 1.23  # C, D: epochs' wall / calibrated compute estimate (scratch 1.29 and 1.23, imagenet 1.18):
#                           data and augmentation, each epoch's evaluation of train-eval and validation images, checkpoints
RUN_SETUP_S = 3.2  # per trained run, outside its epochs (data and model set-up 0.9 s, test predictions 2.3 s)
LINEAR_RUN_SETUP_S = 12.5  # D: an imagenet-linear run beyond its compute x TRAIN_WALL_FACTOR (23.8 s, 9.0 s of compute):
#                           weights loaded, the features of every part extracted, the fit, test predictions
RUN_SKIPPED_S = 0.45  # C: a pretrained run skipped for want of weights
EVALUATION_S_PER_ARM = 0.5  # C, D: evaluate-arms for one completed arm (0.7 s for one, 1.3 s for three)
PACKAGE_S_PER_ARM = 4.1  # C, D: model package + deployment-cost timing of one completed arm (5.4; 4.3, 4.0, 2.7 s)
COMPRESSION_S = 18.0  # C, D: int8 variant of the recommended arm, written, timed and compared, once (20.2, 16.1 s)
VISUAL_S = 3.2  # C, D: saliency pictures and the shortcut check (visual-summary task): 3.2 s + 0.9 s per arm
VISUAL_S_PER_ARM = 0.9  # (4.1 s for one arm, 5.8 s for three)
REPORT_S = 5.8  # C, D: report rendering and artifacts (2.1, 1.5 s), the end of the flow run and of the process (4.9, 3.0 s)

WALL_TIME_FORMULA = (
    "T = T_elapsed (measured: start-up, cohort, ingest, split) + T_cost (measured) "
    "+ sum over trained runs [(FLOPs(arm, e) / (peak x utilisation) x (n_run / n_priced) x (s_run / s_priced)^2) "
    "x f_wall + overhead + T_run] + n_skipped x T_skip "
    "+ n_arms x (T_eval + T_package + T_visual_arm) + T_visual + T_int8 + T_report, "
    "e = the earliest early stop (min) or the last epoch (max), f_wall = epochs' wall time / compute estimate"
)


def earliest_stop_epoch(*, epochs: int, min_epochs: int, patience: int | None) -> int:
    """The first epoch at which early stopping can end a run (tasks.training.loop: it stops once `patience` epochs in a
    row did not improve and epoch >= min(min_epochs, epochs)): best at epoch 1, so max(min(min_epochs, epochs),
    1 + patience), capped at epochs; epochs when early stopping is off."""
    if patience is None:
        return epochs
    return min(epochs, max(min(min_epochs, epochs), 1 + patience))


def run_training_seconds(report: CostReport, run: PlannedRunWork, epochs: int) -> float:
    """This machine's wall-time estimate for `run` trained `epochs` epochs:

        arm_flops_for_epochs(arm, epochs) / (peak x utilisation) x (n_run / n_priced) x (s_run / s_priced)^2
        x TRAIN_WALL_FACTOR + overhead

    i.e. estimated_seconds_for (nanoGPT's estimate_mfu inverted) with the compute scaled to the run's images and
    input side (FLOPs grow with the number of images and, for a convolutional network, with the pixel count), times
    the measured ratio of the epochs' wall time to that compute (what the calibration's bare steps leave out).
    """
    arm = report.arm(run.arm)
    estimate = next(d for d in arm.devices if d.device == THIS_MACHINE)
    scale = (run.n_images / arm.n_images) * (run.image_size / report.inputs.image_size) ** 2
    compute = arm_flops_for_epochs(arm, epochs) / estimate.effective_flops_per_second * scale
    return compute * TRAIN_WALL_FACTOR + estimate.overhead_seconds


def _stage(stage: str, low: float, high: float | None = None, basis: str = "") -> StageTime:
    return StageTime(stage=stage, seconds_min=low, seconds_max=low if high is None else high, basis=basis)


def _training_stages(report: CostReport, runs: list[PlannedRunWork]) -> list[StageTime]:
    """One stage per arm: its trained runs between their earliest stop and their last epoch, plus skipped runs."""
    stages = []
    for arm in dict.fromkeys(run.arm for run in runs):
        trained = [r for r in runs if r.arm == arm and r.trained]
        skipped = sum(1 for r in runs if r.arm == arm and not r.trained)
        linear = parse_arm(arm).mode == "imagenet-linear"
        setup = LINEAR_RUN_SETUP_S if linear else RUN_SETUP_S
        low = sum(run_training_seconds(report, r, r.min_epochs) + setup for r in trained) + skipped * RUN_SKIPPED_S
        high = sum(run_training_seconds(report, r, r.max_epochs) + setup for r in trained) + skipped * RUN_SKIPPED_S
        epochs = sorted({(r.min_epochs, r.max_epochs) for r in trained})
        work = ("one feature pass and a linear fit" if linear
                else f"epochs {', '.join(f'{a}..{b}' if a != b else f'{b}' for a, b in epochs)}")
        basis = (f"{len(trained)} run(s), {work}: cost estimate x {TRAIN_WALL_FACTOR:g} + {setup:g} s each"
                 if trained else "")
        if skipped:
            basis += ("; " if basis else "") + f"{skipped} run(s) skipped (no pretrained weights), {RUN_SKIPPED_S:g} s each"
        stages.append(_stage(f"training {arm}", low, high, basis))
    return stages


def predict_wall_time(report: CostReport, plan: WallTimePlan, *, cost_stage_seconds: float) -> WallTimeEstimate:
    """The whole comparison's wall time, before training starts (WALL_TIME_FORMULA; constants above, from this
    machine's demo logs; training from this machine's calibrated cost estimate, run_training_seconds).

    cost_stage_seconds: the cost stage's own time so far (measured by the caller). The range spans early stopping:
    min = every run stops at its earliest epoch, max = every run trains all its epochs.
    """
    arms = [arm for arm in dict.fromkeys(run.arm for run in plan.runs) if any(r.trained for r in plan.runs if r.arm == arm)]
    stages = [
        _stage("before the cost stage (start-up, cohort, ingest, split)", plan.elapsed_seconds, basis="measured"),
        _stage("cost stage", cost_stage_seconds, basis="measured"),
    ]
    stages += _training_stages(report, plan.runs)
    n = len(arms)
    visual = VISUAL_S + n * VISUAL_S_PER_ARM if n else 0.0
    stages += [
        _stage("evaluation", n * EVALUATION_S_PER_ARM, basis=f"{n} arm(s) x {EVALUATION_S_PER_ARM:g} s"),
        _stage("packages + deployment cost", n * PACKAGE_S_PER_ARM, basis=f"{n} arm(s) x {PACKAGE_S_PER_ARM:g} s"),
        _stage("int8 variant", COMPRESSION_S if n else 0.0, basis="constant, once"),
        _stage("saliency pictures", visual, basis=f"{VISUAL_S:g} s + {n} arm(s) x {VISUAL_S_PER_ARM:g} s"),
        _stage("report", REPORT_S, basis="constant"),
    ]
    notes = []
    if not report.calibrated:
        notes.append("this machine is not calibrated: the training time uses catalogue defaults (expect a large error).")
    if any(not r.trained for r in plan.runs):
        notes.append("pretrained arms are priced as skipped: no weights file was given and none is in torchvision's cache "
                     "(a download, where the network allows one, is not priced).")
    return WallTimeEstimate(
        seconds_min=sum(s.seconds_min for s in stages), seconds_max=sum(s.seconds_max for s in stages),
        stages=stages, formula=WALL_TIME_FORMULA, notes=notes,
    )


def pretrained_weights_available(model: str, weights_path: Path | str | None) -> bool:
    """True when a pretrained run of `model` will find weights: a weights file given, or one in torchvision's cache
    (the places tasks.training.models.resolve_imagenet_weights looks before downloading)."""
    from tasks.training.models import hub_checkpoint_dir, model_def, weights_file_name

    if weights_path:
        return True
    return any((hub_checkpoint_dir() / weights_file_name(weights)).is_file() for weights in model_def(model).weights)


def wall_time_plan(plan: RunPlan, environment: RunEnvironment, *, n_train_images: int,
                   elapsed_seconds: float = 0.0) -> WallTimePlan:
    """What a comparison's plan will train, for predict_wall_time: each run's epochs (earliest stop..last),
    images (n_train_images x its share of the training patients), size, and whether it will find weights (the
    environment's weights file, else torchvision's cache)."""
    runs = []
    for planned in plan.runs:
        spec, config = parse_arm(planned.arm), planned.config
        runs.append(PlannedRunWork(
            arm=planned.arm, max_epochs=config.epochs,
            min_epochs=earliest_stop_epoch(epochs=config.epochs, min_epochs=config.min_epochs, patience=config.early_stopping_patience),
            n_images=max(1, round(n_train_images * planned.train_fraction)), image_size=config.image_size,
            trained=spec.mode == "scratch" or pretrained_weights_available(spec.model, environment.weights),
        ))
    return WallTimePlan(runs=runs, elapsed_seconds=elapsed_seconds)


# ============================================================================================ inputs

# Field of CostInputs -> the CLI flag / flow parameter a person typed, for error sentences.
INPUT_FLAGS = {
    "n_images": "--images",
    "image_size": "--size",
    "channels": "--channels",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "precision": "--precision",
    "arms": "--arms",
    "num_classes": "--num-classes",
    "optimizer": "--optimizer",
    "head_warmup_epochs": "--head-warmup-epochs",
    "linear_fit_iterations": "--linear-fit-iterations",
    "device_memory_gb": "--device-memory-gb",
}
# Used when neither the caller nor the dataset says otherwise.
INPUT_DEFAULTS: dict[str, Any] = {"image_size": 224, "channels": 1, "epochs": 100, "batch_size": 32, "num_classes": 2}


def _field_bounds(field: str) -> tuple[Any, Any]:
    """(ge, le) declared on a CostInputs field, None where unbounded."""
    metadata_items = CostInputs.model_fields[field].metadata
    low = next((m.ge for m in metadata_items if getattr(m, "ge", None) is not None), None)
    high = next((m.le for m in metadata_items if getattr(m, "le", None) is not None), None)
    return low, high


def _validation_sentence(error) -> str:
    """One sentence from a pydantic ValidationError on CostInputs, naming the flag and the allowed values."""
    first = error.errors(include_url=False)[0]
    if not first["loc"]:  # a model-level rule (e.g. warm-up longer than training)
        return first["msg"].removeprefix("Value error, ").rstrip(".") + "."
    field = str(first["loc"][0])
    flag = INPUT_FLAGS.get(field, field)
    ctx = first.get("ctx") or {}
    kind, got = first["type"], first.get("input")
    if kind in ("greater_than_equal", "greater_than") and field in CostInputs.model_fields:
        low, high = _field_bounds(field)
        low = ctx.get("ge", ctx.get("gt")) if low is None else low
        if high is not None:
            return f"{flag} must be between {low} and {high} (got {got})."
        return f"{flag} must be {'at least' if kind == 'greater_than_equal' else 'greater than'} {low} (got {got})."
    if kind == "less_than_equal":
        return f"{flag} must be at most {ctx.get('le')} (got {got})."
    if kind == "literal_error":
        return f"{flag} must be one of {ctx.get('expected')} (got {got!r})."
    return f"{flag}: {first['msg']} (got {got!r})."


def _dataset_facts(dataset: Path) -> dict[str, Any]:
    """CostInputs fields from an ingested dataset's card: images = labelled images (all images when none is
    labelled), size, channels, classes = number of labels (at least 2), and the content hash."""
    from pydantic import ValidationError

    from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard

    card_path = Path(dataset) / DATASET_CARD_FILE
    if not card_path.is_file():
        raise ValueError(f"{dataset} is not a ctcompare dataset folder: {DATASET_CARD_FILE} is missing (run 'ctcompare ingest').")
    try:
        card = read_model_json(card_path, DatasetCard)
    except (ValidationError, ValueError) as error:
        raise ValueError(f"{card_path} is not a valid dataset card ({str(error).splitlines()[0]}).") from None
    labelled = card.n_images - card.n_unlabeled_images
    return {
        "n_images": labelled if labelled > 0 else card.n_images,
        "image_size": card.image_size,
        "channels": card.channels,
        "num_classes": max(2, len(card.label_distribution)),
        "dataset_content_hash": card.content_hash,
    }


def resolve_cost_inputs(*, dataset: Path | None = None, n_images: int | None = None, **settings: Any) -> CostInputs:
    """Validated CostInputs from a dataset folder (dataset.json) or an image count; ValueError = one sentence.

    settings: other CostInputs fields (image_size, channels, epochs, batch_size, arms, precision, optimizer,
    head_warmup_epochs, num_classes, linear_fit_iterations, device_memory_gb). A setting left out or None takes
    the dataset's value where it has one (size, channels, classes), else INPUT_DEFAULTS, else the schema default.
    """
    from pydantic import ValidationError

    unknown = sorted(set(settings) - set(INPUT_FLAGS))
    if unknown:
        raise ValueError(f"unknown cost setting {unknown[0]!r}; valid settings are {', '.join(sorted(INPUT_FLAGS))}.")
    if dataset is not None and n_images is not None:
        raise ValueError("give either --dataset DATASET_DIR or --images N, not both.")
    if dataset is None and n_images is None:
        raise ValueError("give --dataset DATASET_DIR (an ingested dataset folder) or --images N (how many images).")
    source = _dataset_facts(dataset) if dataset is not None else {"n_images": n_images}
    fields = {**INPUT_DEFAULTS, **source, **{k: v for k, v in settings.items() if v is not None}}
    fields["arms"] = [spec.name for spec in parse_arms(fields.get("arms") or default_arms())]  # ValueError: one sentence
    try:
        return CostInputs(**fields)
    except ValidationError as error:
        raise ValueError(_validation_sentence(error)) from None


# ============================================================================================ Prefect tasks


@task(name="cost-calibrate", task_run_name="calibrate-{image_size}px", cache_policy=NO_CACHE)
def calibrate_task(image_size: int, channels: int, precision: Precision, batch_size: int) -> Calibration:
    """Cached calibration of this machine (load_or_calibrate)."""
    return load_or_calibrate(image_size, channels, precision, batch_size)


@task(name="cost-estimate", cache_policy=NO_CACHE)
def estimate_task(inputs: CostInputs, calibration: Calibration | None) -> CostReport:
    """Count, measure and price every arm (build_cost_report)."""
    return build_cost_report(inputs, calibration=calibration)


@task(name="cost-write", cache_policy=NO_CACHE)
def write_task(out_dir: Path, report: CostReport) -> Path:
    """Write cost.json atomically."""
    return write_cost_report(out_dir, report)
