"""Compute-cost estimate of each training arm: FLOPs counted on the real model, memory measured, time per device.

The classic back-of-envelope ("ResNet-50 on ImageNet took ~14 days on one M40, ~10^18 operations; a dataset
10,000x smaller costs 10,000x less per epoch; grayscale makes conv1 3x cheaper; cost scales with pixel count") is
done here from the actual model and dataset:

    forward FLOPs per image   counted by torch.utils.flop_counter.FlopCounterMode on ResNet-50 at the configured
                              size and channel count (on the meta device: shapes only, no arithmetic is done).
    training FLOPs per image  counted the same way over a real forward + backward with the arm's freezing applied,
                              so a frozen layer contributes no weight gradient and a frozen prefix no backward at
                              all. For full backprop this comes out at ~3x forward (forward F, input gradients ~F,
                              weight gradients ~F: Kaplan et al. 2020, "Scaling Laws", C ~ 6N per token = 3 x 2N).
    time                      FLOPs / (peak FLOP/s at the precision x utilisation), nanoGPT estimate_mfu style,
                              with peak and utilisation per device from data_schemas/devices.json; for this
                              machine both come from a short calibration.

FLOP convention: FlopCounterMode counts 2 FLOPs per multiply-add (MAC). ResNet-50 at 224 x 224 x 3 is ~4.1 G MAC =
~8.2 GFLOPs forward. The "10^18 single-precision operations" for 90 ImageNet epochs in You et al. 2018 ("ImageNet
Training in Minutes") is in MACs: 1.28e6 images x 90 epochs x 3 (fwd+bwd) x 4.1e9 MAC ~ 1.4e18 MAC ~ 2.8e18 FLOPs.
At the M40's 7 TFLOP/s FP32 peak and the catalogue's 35% utilisation: 2.8e18 / (7e12 x 0.35) ~ 1.15e6 s ~ 13 days,
i.e. the quoted "14 days" (tests/test_cost.py checks it).

Layering: plain typed functions first, thin Prefect @task wrappers at the end. The model is built here by
_resnet50_for_counting until tasks.models.build_resnet50 exists.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from importlib import resources
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from data_schemas.cost import (
    ARM_DESCRIPTIONS,
    COST_FILE,
    THIS_MACHINE,
    ActualCost,
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
    Precision,
)
from data_schemas.files import read_model_json, sha256_file, sha256_json, write_model_json
from reports.formatting import format_duration  # the cost tables move to reports/ (one-way imports)

FEATURE_DIM = 2048  # ResNet-50's pooled feature width
MEMORY_USABLE_FRACTION = 0.9  # leave 10% of device memory for the framework, kernels' workspace and fragmentation
ACTIVATION_MEASURE_MAX_SIZE = 320  # above this, activations are measured at 320 px and scaled by pixel count

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


# ============================================================================================ the model


def _resnet50_for_counting(in_channels: int = 1, num_classes: int = 2, dropout: float = 0.0, device: str = "cpu"):
    """ResNet-50 as training builds it: conv1 for `in_channels`, fc = Dropout + Linear(2048, num_classes).

    TODO(lead): switch to tasks.models.build_resnet50(in_channels, num_classes, dropout) once it lands.
    """
    import torch
    import torchvision
    from torch import nn

    with torch.device(device):
        model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_DIM, num_classes))
    return model


def _apply_phase(model, phase: str):
    """Set requires_grad and mode for a training phase.

    phase: "full" every parameter trainable (scratch, imagenet fine-tuning);
           "head" only the classifier `fc` trainable (imagenet head-only warm-up epochs);
           "features" frozen backbone in eval mode, fc replaced by Identity (imagenet-linear feature extraction).
    """
    from torch import nn

    if phase == "full":
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
    elif phase == "head":
        model.train()
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    elif phase == "features":
        model.fc = nn.Identity()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        raise ValueError(f"unknown phase {phase!r}; use full, head or features")
    return model


def freeze_modules(model, prefixes: tuple[str, ...]):
    """Freeze every parameter whose name starts with one of `prefixes` (e.g. ("conv1", "bn1", "layer1"))."""
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    return model


# ============================================================================================ counting FLOPs


def count_flops(model, image_size: int, channels: int, backward: bool, batch: int = 2) -> float:
    """FLOPs per image of one forward (and, if `backward`, the backward) pass, counted with FlopCounterMode.

    The pass runs on whatever device the model is on (the meta device makes it free: shapes only). Backward runs
    only if some parameter requires grad, and autograd computes only what the trainable parameters need: a frozen
    layer gets no weight gradient, a frozen prefix of the network gets no backward at all. The input never requires
    grad, so conv1's input gradient is never computed. Counted at `batch` (2: BatchNorm in train mode refuses one
    value per channel) and divided by it; FLOPs are linear in batch.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(batch, channels, image_size, image_size, device=device)
    needs_backward = backward and any(p.requires_grad for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(needs_backward):
            out = model(x)
        if needs_backward:
            out.float().sum().backward()
    return counter.get_total_flops() / batch


@dataclass(frozen=True)
class PhaseCounts:
    """Counts for one training phase of ResNet-50 at one size and channel count."""

    phase: str
    forward_flops_per_image: float
    train_flops_per_image: float  # forward + backward for full/head; == forward for features
    params_total: int
    params_trainable: int
    buffers: int


@functools.lru_cache(maxsize=64)
def count_phase(phase: str, image_size: int, channels: int, num_classes: int = 2) -> PhaseCounts:
    """FLOPs and parameter counts of one phase (cached per process by its arguments). See count_flops."""
    model = _apply_phase(_resnet50_for_counting(channels, num_classes, device="meta"), phase)
    forward = count_flops(model, image_size, channels, backward=False)
    train = count_flops(model, image_size, channels, backward=True)
    return PhaseCounts(
        phase=phase,
        forward_flops_per_image=forward,
        train_flops_per_image=train,
        params_total=sum(p.numel() for p in model.parameters()),
        params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        buffers=sum(b.numel() for b in model.buffers()),
    )


def linear_fit_flops(n_images: int, num_classes: int = 2, iterations: int = 100, dim: int = FEATURE_DIM) -> float:
    """FLOPs of fitting logistic regression on the extracted features (imagenet-linear arm).

    iterations x (2 n d c for the logits X.W  +  2 n d c for the gradient X^T.R) = 4 n d c per L-BFGS iteration,
    with c = 1 weight vector for two classes, num_classes otherwise; line-search re-evaluations are ignored. For
    1,500 images that is ~1.2 GFLOPs per 100 iterations: negligible next to the feature pass (~12 TFLOPs).
    """
    c = 1 if num_classes == 2 else num_classes
    return float(iterations) * 4.0 * n_images * dim * c


def classifier_params(num_classes: int = 2, dim: int = FEATURE_DIM) -> int:
    """Parameters of the logistic regression on `dim` features (one vector for two classes)."""
    c = 1 if num_classes == 2 else num_classes
    return dim * c + c


# ============================================================================================ memory


def _autocast_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision in ("bf16", "fp16") else None


def _storage_key(t) -> int:
    return t.untyped_storage()._cdata


def _saved_tensor_bytes(model, x, precision: str) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one forward (parameters excluded)."""
    import torch

    param_keys = {_storage_key(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in param_keys:
            seen[key] = t.untyped_storage().nbytes()
        return t

    dtype = _autocast_dtype(precision)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    return sum(seen.values())


def _inference_peak_bytes(model, x, precision: str) -> int:
    """Approximate live activation bytes of a no-grad forward: max over leaf modules of input + output, plus the
    largest residual-block input (kept alive for the skip connection)."""
    import torch

    leaf_peak = 0
    block_in = 0

    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, (tuple, list)):
            return sum(nbytes(o) for o in obj)
        return 0

    def leaf_hook(_m, inputs, output):
        nonlocal leaf_peak
        leaf_peak = max(leaf_peak, nbytes(inputs) + nbytes(output))

    def block_hook(_m, inputs, _output):
        nonlocal block_in
        block_in = max(block_in, nbytes(inputs))

    handles = []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            handles.append(module.register_forward_hook(leaf_hook))
        elif name.count(".") == 1 and name.startswith("layer"):
            handles.append(module.register_forward_hook(block_hook))
    dtype = _autocast_dtype(precision)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return leaf_peak + block_in


@functools.lru_cache(maxsize=64)
def measure_activation_memory(
    phase: str, image_size: int, channels: int, precision: str, num_classes: int = 2
) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of activations for one phase, measured on this CPU.

    Training phases: the distinct tensors autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
    at the precision's autocast (bf16/fp16 -> CPU bf16 autocast, which keeps some fp32 copies: measured, not
    assumed halved), parameters excluded. Measured at batch 2 and 4: per image = (b4 - b2) / 2; fixed = the
    batch-independent rest (autocast's low-precision weight copies). The feature phase has no backward: the
    approximate peak of live tensors of a no-grad forward (see _inference_peak_bytes). Above
    ACTIVATION_MEASURE_MAX_SIZE px it is measured there and scaled by pixel count.
    """
    import torch

    measure_size = min(image_size, ACTIVATION_MEASURE_MAX_SIZE)
    scale = (image_size / measure_size) ** 2
    model = _apply_phase(_resnet50_for_counting(channels, num_classes), phase).to(memory_format=torch.channels_last)
    results = []
    for batch in (2, 4):
        x = torch.zeros(batch, channels, measure_size, measure_size).to(memory_format=torch.channels_last)
        if phase == "features":
            results.append(_inference_peak_bytes(model, x, precision))
        else:
            results.append(_saved_tensor_bytes(model, x, precision))
    per_image = max(0, (results[1] - results[0]) // 2)
    fixed = max(0, results[0] - 2 * per_image)
    return fixed, int(per_image * scale)


def optimizer_state_bytes(trainable_params: int, optimizer: str) -> int:
    """Adam keeps two fp32 moments per trainable parameter (8 bytes); SGD with momentum one (4 bytes)."""
    per_param = {"adam": 8, "sgd": 4}[optimizer]
    return trainable_params * per_param


def max_batch_size(memory_bytes: float, fixed_bytes: int, per_image_bytes: int, cap: int = 65_536) -> int:
    """Largest batch with fixed + batch x per_image <= 90% of memory (0 when not even one image fits)."""
    usable = memory_bytes * MEMORY_USABLE_FRACTION - fixed_bytes
    if usable < per_image_bytes:
        return 0
    if per_image_bytes <= 0:
        return cap
    return int(min(cap, usable // per_image_bytes))


# ============================================================================================ devices and time


def default_catalogue_path() -> Path:
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


def bf16_supported() -> bool:
    """True when this CPU runs bf16 natively; the one check training uses too (tasks.runtime)."""
    from tasks.runtime import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def this_machine_precision(requested: str) -> str:
    """bf16/fp16 requests run as bf16 autocast when the CPU supports it, else fp32; a CPU has no tf32."""
    return "bf16" if requested in ("bf16", "fp16") and bf16_supported() else "fp32"


# ============================================================================================ calibration


def calibration_cache_path() -> Path:
    """$CTCOMPARE_CACHE_DIR/calibration.json, else .ctcompare/calibration.json in the working folder."""
    base = os.environ.get("CTCOMPARE_CACHE_DIR")
    return (Path(base) if base else Path.cwd() / ".ctcompare") / "calibration.json"


def _calibration_key(image_size: int, channels: int, precision: str) -> tuple[str, dict]:
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


def calibrate_this_machine(
    image_size: int, channels: int, requested_precision: str = "bf16", batch_size: int = 32, time_budget_s: float = 15.0,
    min_timed_s: float = 4.0,
) -> Calibration:
    """Measure this machine: a matrix-product rate (taken as peak) and a few real ResNet-50 training steps.

    Training steps are what training does: channels_last, bf16 autocast when the CPU supports bf16 (else fp32),
    Adam, cross-entropy, at the configured size. Batch = min(batch_size, ~1.2e11 FLOPs / train FLOPs per image) so
    a step takes about a second; two warm-up steps (oneDNN builds its kernels), then timed steps until at least 3
    steps and `min_timed_s` seconds are done, or `time_budget_s` (whole calibration) runs out; the mean step time
    (not the best) is used because wall time on a shared machine includes the stalls. utilisation = achieved training FLOP/s / matmul FLOP/s, so that
    FLOPs / (peak x utilisation) reproduces the measured training throughput exactly.
    """
    import torch
    from torch import nn

    started = time.perf_counter()
    precision = this_machine_precision(requested_precision)
    key, fields = _calibration_key(image_size, channels, precision)
    autocast_on = precision == "bf16"
    peak = _matmul_rate(torch.bfloat16 if autocast_on else torch.float32)

    flops_per_image = count_phase("full", image_size, channels, 2).train_flops_per_image
    batch = int(max(2, min(batch_size, 1.2e11 // flops_per_image)))
    model = _resnet50_for_counting(channels, 2).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, channels, image_size, image_size).to(memory_format=torch.channels_last)
    y = torch.arange(batch) % 2

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    warmup_times = []
    for _ in range(2):
        t0 = time.perf_counter()
        step()
        warmup_times.append(time.perf_counter() - t0)
    deadline = started + time_budget_s
    steps, timed = 0, 0.0
    while (steps < 3 or timed < min_timed_s) and (steps == 0 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        step()
        timed += time.perf_counter() - t0
        steps += 1
    images_per_second = steps * batch / timed
    warmup_seconds = max(0.0, warmup_times[0] - timed / steps)
    train_rate = images_per_second * flops_per_image
    peak = max(peak, train_rate)  # a loaded machine can make the short matmul probe look slower than training
    return Calibration(
        key=key,
        **fields,
        matmul_flops_per_second=peak,
        train_batch_size=batch,
        train_steps=steps,
        train_images_per_second=images_per_second,
        train_flops_per_image=flops_per_image,
        train_flops_per_second=train_rate,
        utilisation=train_rate / peak,
        warmup_seconds=warmup_seconds,
        seconds_taken=time.perf_counter() - started,
        measured_at=_now(),
    )


def load_or_calibrate(
    image_size: int,
    channels: int,
    requested_precision: str = "bf16",
    batch_size: int = 32,
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
    utilisation = achieved training FLOP/s / peak.
    """
    devices = []
    for device in catalogue.devices:
        if device.name == THIS_MACHINE:
            rates = dict(device.rates)
            if not bf16_supported():
                rates.pop("bf16", None)
                rates.pop("fp16", None)
            if calibration is not None:
                rates[calibration.precision] = DeviceRate(
                    peak_tflops=calibration.matmul_flops_per_second / 1e12,
                    utilisation=min(1.0, calibration.utilisation),
                )
            source = device.source
            if calibration is not None:
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


def memory_estimate(
    params_total: int, buffers: int, params_trainable: int, optimizer: str, fixed: int, per_image: int, batch: int
) -> MemoryEstimate:
    """weights 4 B x (params + buffers), gradients 4 B x trainable, optimizer state (Adam 8 B, SGD 4 B) x trainable,
    activations = fixed + batch x per image, measured (measure_activation_memory)."""
    weights = 4 * (params_total + buffers)
    gradients = 4 * params_trainable
    opt = optimizer_state_bytes(params_trainable, optimizer) if params_trainable else 0
    activations = fixed + batch * per_image
    return MemoryEstimate(
        weights_bytes=weights,
        gradients_bytes=gradients,
        optimizer_bytes=opt,
        activations_bytes_per_image=per_image,
        activations_fixed_bytes=fixed,
        activations_bytes=activations,
        total_bytes=weights + gradients + opt + activations,
        method="",
    )


def estimate_arm(
    arm: str, inputs: CostInputs, catalogue: DeviceCatalogue, overheads: dict[str, float] | None = None
) -> ArmCost:
    """The full estimate of one arm on every catalogue device.

    scratch          total = epochs x n x train(full)
    imagenet         total = warmup x n x train(head) + (epochs - warmup) x n x train(full); a head-only epoch
                     is a forward of the whole net plus the backward of fc only (counted, not assumed)
    imagenet-linear  total = n x forward(backbone, no grad) + linear_fit_flops(n); one pass, no epochs
    seconds          = total / (peak x utilisation) + overhead; overhead = the calibrated first-step warm-up on
                     this machine (`overheads` by device name), 0 elsewhere
    """
    overheads = overheads or {}
    n, size, ch, k = inputs.n_images, inputs.image_size, inputs.channels, inputs.num_classes
    formulas: list[str] = []
    head_per_image: float | None = None
    fit_flops = 0.0
    if arm == "imagenet-linear":
        counts = count_phase("features", size, ch, k)
        phase_for_memory = "features"
        forward = counts.forward_flops_per_image
        train_per_image = forward
        fit_flops = linear_fit_flops(n, k, inputs.linear_fit_iterations)
        per_epoch = n * forward
        total = per_epoch + fit_flops
        epochs_effective = 1
        params_total = counts.params_total + classifier_params(k)
        params_trainable = classifier_params(k)
        formulas += [
            "flops_total = n_images x forward_flops_per_image (one no-grad feature pass) + classifier_fit_flops",
            f"classifier_fit_flops = iterations ({inputs.linear_fit_iterations}) x 4 x n x 2048 x classes(1 if binary)",
        ]
    else:
        counts = count_phase("full", size, ch, k)
        phase_for_memory = "full"
        forward = counts.forward_flops_per_image
        train_per_image = counts.train_flops_per_image
        per_epoch = n * train_per_image
        warmup = inputs.head_warmup_epochs if arm == "imagenet" else 0
        total = (inputs.epochs - warmup) * per_epoch
        if warmup:
            head_per_image = count_phase("head", size, ch, k).train_flops_per_image
            total += warmup * n * head_per_image
            formulas.append("flops_total = warmup x n x head_phase_flops_per_image + (epochs - warmup) x flops_per_epoch")
        else:
            formulas.append("flops_total = epochs x flops_per_epoch")
        formulas.append("flops_per_epoch = n_images x train_flops_per_image (counted forward + backward, ~3x forward)")
        epochs_effective = inputs.epochs
        params_total = counts.params_total
        params_trainable = counts.params_trainable
    formulas.append("seconds = flops / (peak FLOP/s at precision x utilisation) + overhead (this machine: warm-up)")

    fixed, per_image = measure_activation_memory(phase_for_memory, size, ch, inputs.precision, k)
    trainable_on_device = 0 if arm == "imagenet-linear" else params_trainable
    memory = memory_estimate(
        counts.params_total, counts.buffers, trainable_on_device, inputs.optimizer, fixed, per_image, inputs.batch_size
    )
    memory.method = (
        "no-grad forward: peak of live tensors (max leaf input+output plus the residual input), measured on CPU"
        if arm == "imagenet-linear"
        else "tensors saved for backward (saved_tensors_hooks), measured on CPU at batch 2 and 4 under "
        + ("bf16 autocast" if inputs.precision in ("bf16", "fp16") else "fp32")
    )
    memory_fixed = memory.weights_bytes + memory.gradients_bytes + memory.optimizer_bytes + fixed
    formulas.append("max_batch = floor((0.9 x device memory - weights - gradients - optimizer - fixed) / per-image activations)")

    devices = []
    for device in catalogue.devices:
        precision = resolve_precision(device, inputs.precision)
        rate = device.rates[precision]
        eff = rate.effective_flops_per_second
        mb = max_batch_size(device.memory_gb * 1e9, memory_fixed, per_image)
        overhead = overheads.get(device.name, 0.0)
        devices.append(
            DeviceEstimate(
                device=device.name,
                precision=precision,
                peak_flops_per_second=rate.peak_tflops * 1e12,
                utilisation=rate.utilisation,
                effective_flops_per_second=eff,
                seconds_per_epoch=per_epoch / eff,
                overhead_seconds=overhead,
                seconds=total / eff + overhead,
                max_batch_size=mb,
                batch_fits=mb >= inputs.batch_size,
            )
        )
    given = None
    if inputs.device_memory_gb is not None:
        given = max_batch_size(inputs.device_memory_gb * 1e9, memory_fixed, per_image)
    return ArmCost(
        arm=arm,
        description=ARM_DESCRIPTIONS[arm],
        params_total=params_total,
        params_trainable=params_trainable,
        forward_flops_per_image=forward,
        train_flops_per_image=train_per_image,
        head_phase_flops_per_image=head_per_image,
        classifier_fit_flops=fit_flops,
        flops_per_epoch=per_epoch,
        flops_total=total,
        epochs_effective=epochs_effective,
        memory=memory,
        max_batch_for_given_memory=given,
        devices=devices,
        formulas=formulas,
    )


def config_hash(inputs: CostInputs, catalogue_sha256: str, calibrate: bool) -> str:
    """Identity of an estimate: inputs, catalogue content, calibration choice and schema version."""
    return sha256_json(
        {"inputs": inputs.model_dump(mode="json"), "catalogue": catalogue_sha256, "calibrate": calibrate, "v": "1.0"}
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
    """Estimate every requested arm on every device (this-machine priced from `calibration` when given)."""
    catalogue_path = Path(catalogue_path or default_catalogue_path())
    catalogue = catalogue or load_catalogue(catalogue_path)
    priced = price_this_machine(catalogue, calibration)
    overheads = {THIS_MACHINE: calibration.warmup_seconds} if calibration is not None else {}
    cat_sha = sha256_file(catalogue_path)
    notes = [
        "Estimates price compute only: data loading, augmentation and evaluation passes are not included.",
        "Utilisation figures for GPUs are assumptions stated in devices.json, not measurements.",
    ]
    if calibration is None:
        notes.append("this-machine uses catalogue defaults (not calibrated): expect a large error.")
    return CostReport(
        created_at=_now(),
        ctcompare_version=_version(),
        config_hash=config_hash(inputs, cat_sha, calibration is not None),
        flop_convention=FLOP_CONVENTION,
        inputs=inputs,
        calibrated=calibration is not None,
        calibration=calibration,
        catalogue_sha256=cat_sha,
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
    except Exception:
        return None
    return report if report.config_hash == expected_hash else None


def write_cost_report(out_dir: Path, report: CostReport) -> Path:
    path = Path(out_dir) / COST_FILE
    write_model_json(path, report)
    return path


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


def _validation_sentence(error) -> str:
    """One sentence from a pydantic ValidationError on CostInputs, naming the flag and the allowed values."""
    first = error.errors(include_url=False)[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    flag = INPUT_FLAGS.get(field, field or "input")
    ctx = first.get("ctx") or {}
    kind = first["type"]
    got = first.get("input")
    if kind in ("greater_than_equal", "greater_than") and field in CostInputs.model_fields:
        bounds = CostInputs.model_fields[field].metadata
        lo = next((getattr(m, "ge", None) for m in bounds if getattr(m, "ge", None) is not None), ctx.get("ge", ctx.get("gt")))
        hi = next((getattr(m, "le", None) for m in bounds if getattr(m, "le", None) is not None), None)
        allowed = f"between {lo} and {hi}" if hi is not None else (f"at least {lo}" if kind == "greater_than_equal" else f"greater than {lo}")
        return f"{flag} must be {allowed} (got {got})."
    if kind == "less_than_equal":
        return f"{flag} must be at most {ctx.get('le')} (got {got})."
    if kind == "literal_error":
        return f"{flag} must be one of {ctx.get('expected')} (got {got!r})."
    return f"{flag}: {first['msg']} (got {got!r})."


def resolve_cost_inputs(
    *,
    dataset: Path | None = None,
    n_images: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    epochs: int = 100,
    batch_size: int = 32,
    arms: list[str] | None = None,
    precision: str = "bf16",
    optimizer: str = "adam",
    head_warmup_epochs: int = 0,
    device_memory_gb: float | None = None,
    num_classes: int | None = None,
    linear_fit_iterations: int = 100,
) -> CostInputs:
    """Validated CostInputs from a dataset folder (dataset.json) or an image count; ValueError = one sentence.

    From a dataset: images = labelled images (all images when none is labelled), size and channels from the
    card unless given, classes = number of labels (at least 2).
    """
    from pydantic import ValidationError

    from data_schemas.cost import ARM_NAMES
    from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard

    if dataset is not None and n_images is not None:
        raise ValueError("give either --dataset DATASET_DIR or --images N, not both.")
    if dataset is None and n_images is None:
        raise ValueError("give --dataset DATASET_DIR (an ingested dataset folder) or --images N (how many images).")
    content_hash = None
    if dataset is not None:
        card_path = Path(dataset) / DATASET_CARD_FILE
        if not card_path.is_file():
            raise ValueError(f"{dataset} is not a ctcompare dataset folder: {DATASET_CARD_FILE} is missing (run 'ctcompare ingest').")
        try:
            card = read_model_json(card_path, DatasetCard)
        except (ValidationError, ValueError) as error:
            raise ValueError(f"{card_path} is not a valid dataset card ({str(error).splitlines()[0]}).") from None
        labelled = card.n_images - card.n_unlabeled_images
        n_images = labelled if labelled > 0 else card.n_images
        image_size = card.image_size if image_size is None else image_size
        channels = card.channels if channels is None else channels
        num_classes = max(2, len(card.label_distribution)) if num_classes is None else num_classes
        content_hash = card.content_hash
    arms = list(arms) if arms else list(ARM_NAMES)
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown:
        raise ValueError(f"unknown arm {unknown[0]!r}; valid arms are {', '.join(ARM_NAMES)}.")
    try:
        return CostInputs(
            n_images=n_images,
            image_size=224 if image_size is None else image_size,
            channels=1 if channels is None else channels,
            epochs=epochs,
            batch_size=batch_size,
            precision=precision,
            arms=arms,
            num_classes=2 if num_classes is None else num_classes,
            optimizer=optimizer,
            head_warmup_epochs=head_warmup_epochs,
            linear_fit_iterations=linear_fit_iterations,
            device_memory_gb=device_memory_gb,
            dataset_content_hash=content_hash,
        )
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        if not first["loc"]:  # a model-level rule (e.g. warm-up longer than training)
            raise ValueError(first["msg"].removeprefix("Value error, ").rstrip(".") + ".") from None
        raise ValueError(_validation_sentence(error)) from None


# ============================================================================================ estimate vs actual


def estimated_seconds_for(arm: ArmCost, device: str, epochs_run: int | None = None) -> float:
    """The estimate of `arm` on `device` for `epochs_run` epochs (None: the planned run). Linear arm: one pass."""
    for estimate in arm.devices:
        if estimate.device == device:
            if epochs_run is None or arm.arm == "imagenet-linear":
                return estimate.seconds
            compute = estimate.seconds - estimate.overhead_seconds
            return compute * epochs_run / max(1, arm.epochs_effective) + estimate.overhead_seconds
    raise KeyError(f"arm {arm.arm!r} has no estimate for device {device!r}")


def estimate_vs_actual(estimate: ArmCost | float, actual: ActualCost | float) -> float:
    """actual seconds / estimated seconds (1.0 = perfect, 2.0 = took twice the estimate).

    With an ArmCost and an ActualCost, the estimate is taken on actual.device for actual.epochs_run epochs.
    """
    if isinstance(estimate, ArmCost):
        if not isinstance(actual, ActualCost):
            raise TypeError("with an ArmCost estimate, pass an ActualCost (it names the device and epochs run)")
        estimate = estimated_seconds_for(estimate, actual.device, actual.epochs_run)
    wall = actual.wall_seconds if isinstance(actual, ActualCost) else float(actual)
    if estimate <= 0:
        raise ValueError("estimated seconds must be positive")
    return wall / float(estimate)


def record_actual(cost_path: Path, arm: str, actual: ActualCost) -> CostReport:
    """Fill in what training really took for `arm` in cost.json (atomically) and return the updated report.

    Fills achieved_flops_per_second (flops of the epochs run / wall seconds) and utilisation (achieved / the
    device's peak at the precision used) when missing, and estimated_seconds / actual_over_estimate.
    """
    cost_path = Path(cost_path)
    report = read_model_json(cost_path, CostReport)
    target = report.arm(arm)
    update: dict = {"recorded_at": actual.recorded_at or _now()}
    try:
        est = estimated_seconds_for(target, actual.device, actual.epochs_run)
        update["estimated_seconds"] = est
        update["actual_over_estimate"] = actual.wall_seconds / est
        device_estimate = next(d for d in target.devices if d.device == actual.device)
        if actual.achieved_flops_per_second is None and actual.epochs_run:
            if target.arm == "imagenet-linear":
                done = target.flops_total
            else:
                done = target.flops_total * actual.epochs_run / max(1, target.epochs_effective)
            update["achieved_flops_per_second"] = done / actual.wall_seconds
        achieved = update.get("achieved_flops_per_second", actual.achieved_flops_per_second)
        if actual.utilisation is None and achieved is not None:
            update["utilisation"] = achieved / device_estimate.peak_flops_per_second
        if actual.precision is None:
            update["precision"] = device_estimate.precision
    except (KeyError, StopIteration):
        pass  # a device outside the catalogue: keep what the caller measured
    arms = [a.model_copy(update={"actual": actual.model_copy(update=update)}) if a.arm == arm else a for a in report.arms]
    report = report.model_copy(update={"arms": arms})
    report = CostReport.model_validate(report.model_dump())
    write_model_json(cost_path, report)
    return report


# ============================================================================================ presentation


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def format_table(report: CostReport) -> str:
    """Compact terminal table: one block of counts per arm, then estimated time per arm x device."""
    i = report.inputs
    lines = [
        f"{i.n_images} images, {i.image_size} px, {i.channels} ch, {i.epochs} epochs, batch {i.batch_size}, "
        f"{i.precision}, {i.optimizer}" + ("" if report.calibrated else "  (this-machine not calibrated)"),
        "",
        f"{'arm':<16}{'params (train)':>17}{'fwd GF/img':>11}{'train GF/img':>13}{'total PF':>10}{'mem@batch':>11}",
    ]
    for a in report.arms:
        lines.append(
            f"{a.arm:<16}{_params(a.params_total) + ' (' + _params(a.params_trainable) + ')':>17}"
            f"{a.forward_flops_per_image / 1e9:>11.2f}{a.train_flops_per_image / 1e9:>13.2f}"
            f"{a.flops_total / 1e15:>10.2f}{_gb(a.memory.total_bytes):>11}"
        )
    names = [d.name for d in report.devices]
    short = {d.name: d.label.replace("Tesla ", "").replace("GeForce ", "").replace("GTX ", "").replace(" SXM2", "")
             .replace(" SXM 80GB", "").replace(" SXM", "") for d in report.devices}
    short[THIS_MACHINE] = "this"
    width = max(9, 2 + max(len(label) for label in short.values()))
    lines += ["", "estimated time" + " " * 2 + "".join(f"{short[n]:>{width}}" for n in names)]
    for a in report.arms:
        by = {d.device: d for d in a.devices}
        lines.append(f"{a.arm:<16}" + "".join(f"{format_duration(by[n].seconds):>{width}}" for n in names))
    lines.append(f"{'max batch':<16}" + "".join(
        f"{min(by.max_batch_size for by in [next(d for d in a.devices if d.device == n) for a in report.arms]):>{width}}"
        for n in names
    ))
    given = [a for a in report.arms if a.max_batch_for_given_memory is not None]
    if given:
        lines.append(
            f"max batch in {i.device_memory_gb:g} GB: "
            + ", ".join(f"{a.arm} {a.max_batch_for_given_memory}" for a in given)
        )
    actual = [a for a in report.arms if a.actual is not None]
    if actual:
        lines += ["", "actual (training stage)"]
        for a in actual:
            ratio = f"{a.actual.actual_over_estimate:.2f}x estimate" if a.actual.actual_over_estimate else ""
            lines.append(
                f"{a.arm:<16}{format_duration(a.actual.wall_seconds):>9} on {a.actual.device}, "
                f"{a.actual.images_per_second:.1f} img/s  {ratio}"
            )
    return "\n".join(lines)


def markdown_table(report: CostReport) -> str:
    """The Prefect artifact: inputs, counts per arm, estimated time per arm x device, estimate vs actual."""
    i = report.inputs
    names = [d.name for d in report.devices]
    labels = {d.name: d.label for d in report.devices}
    out = [
        "# ctcompare cost estimate",
        "",
        f"{i.n_images} images, {i.image_size} px, {i.channels} channel(s), {i.epochs} epochs, batch {i.batch_size}, "
        f"{i.precision}, {i.optimizer}. {report.flop_convention}",
        "",
        "| arm | params (trainable) | fwd GFLOPs/img | train GFLOPs/img | total PFLOPs | memory @ batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in report.arms:
        out.append(
            f"| {a.arm} | {_params(a.params_total)} ({_params(a.params_trainable)}) | "
            f"{a.forward_flops_per_image / 1e9:.2f} | {a.train_flops_per_image / 1e9:.2f} | "
            f"{a.flops_total / 1e15:.3f} | {_gb(a.memory.total_bytes)} |"
        )
    out += ["", "| arm | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---:|" * len(names)]
    for a in report.arms:
        by = {d.device: d for d in a.devices}
        cells = [f"{format_duration(by[n].seconds)} (max batch {by[n].max_batch_size})" for n in names]
        out.append(f"| {a.arm} | " + " | ".join(cells) + " |")
    actual = [a for a in report.arms if a.actual is not None]
    if actual:
        out += ["", "| arm | device | estimated | actual | actual / estimate | img/s |", "|---|---|---:|---:|---:|---:|"]
        for a in actual:
            est = a.actual.estimated_seconds
            out.append(
                f"| {a.arm} | {a.actual.device} | {format_duration(est) if est else '-'} | "
                f"{format_duration(a.actual.wall_seconds)} | "
                f"{a.actual.actual_over_estimate:.2f} | {a.actual.images_per_second:.1f} |"
                if a.actual.actual_over_estimate
                else f"| {a.arm} | {a.actual.device} | - | {format_duration(a.actual.wall_seconds)} | - | "
                f"{a.actual.images_per_second:.1f} |"
            )
    if report.calibration:
        c = report.calibration
        out += [
            "",
            f"This machine: {c.precision} matmul {c.matmul_flops_per_second / 1e9:.0f} GFLOP/s, ResNet-50 training "
            f"{c.train_images_per_second:.1f} img/s at {c.image_size} px (utilisation {c.utilisation:.2f}).",
        ]
    out += ["", *[f"- {n}" for n in report.notes]]
    return "\n".join(out)


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


def report_json(report: CostReport) -> str:
    return json.dumps(report.model_dump(mode="json"), indent=2)


__all__ = [
    "FLOP_CONVENTION",
    "PhaseCounts",
    "count_flops",
    "count_phase",
    "freeze_modules",
    "linear_fit_flops",
    "measure_activation_memory",
    "max_batch_size",
    "load_catalogue",
    "resolve_precision",
    "estimate_seconds",
    "calibrate_this_machine",
    "load_or_calibrate",
    "price_this_machine",
    "estimate_arm",
    "build_cost_report",
    "resolve_cost_inputs",
    "config_hash",
    "existing_report",
    "write_cost_report",
    "estimate_vs_actual",
    "record_actual",
    "format_table",
    "markdown_table",
]
