"""Training memory of each arm: weights, gradients, optimizer state and activations, the last measured on this CPU."""

from __future__ import annotations

import functools

from data_schemas.arms import DEFAULT_MODEL
from data_schemas.cost import MemoryEstimate, PhaseCounts
from data_schemas.files import sha256_json
from tasks.common.environment import cpu_name
from tasks.cost.caches import counting_code_version, read_model_counts, remember_model_counts
from tasks.cost.flops import phase_model

MEMORY_USABLE_FRACTION = 0.9  # leave 10% of device memory for the framework, kernels' workspace and fragmentation
ACTIVATION_MEASURE_MAX_SIZE = 320  # above this, activations are measured at 320 px and scaled by pixel count


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
    phase: str, image_size: int, channels: int, precision: str, num_classes: int = 2, model: str = DEFAULT_MODEL
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
                       "classes": num_classes, "model": model, "cpu": cpu_name(), "code": counting_code_version()})
    cached = read_model_counts().activation_bytes.get(key)
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
    remember_model_counts(lambda cache: cache.activation_bytes.__setitem__(key, measured))
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
