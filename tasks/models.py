"""ResNet-50 builders for the three arms, and loading/checking ImageNet weights (torchvision format).

Grey input. Every arm is fed z = (g - GRAY_MEAN) / GRAY_STD, with g the [0, 1] grey image. For the pretrained
arms the RGB conv1 is folded to one input channel so that the network computes what torchvision's RGB network
computes on the grey image replicated three times and normalised per channel with ImageNet's mean/std:

    sum_c w_c * (g - mean_c) / std_c  =  [GRAY_STD * sum_c w_c / std_c] * z  +  sum_c w_c * (GRAY_MEAN - mean_c) / std_c

The first term is the new 1-channel kernel (the sum of the RGB kernels, each scaled by its channel's 1/std; with
equal stds it is exactly the plain sum of the RGB kernels). The second term is a per-output-channel constant; conv1
has no bias, but bn1 comes next, so the constant is folded into bn1's running mean. The result is exact wherever the
7x7 window lies inside the image; only the 3-pixel zero-padding border differs (the RGB network pads with each
channel's mean, the grey one with GRAY_MEAN, which differ by at most 0.04 in [0, 1] units). tests/test_models.py
checks the equality on interior positions. The cost is a third of the replicated-RGB conv1.
"""

from __future__ import annotations

import math
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models import ResNet, ResNet50_Weights, resnet50

from data_schemas.training import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, WeightsInfo
from data_schemas.files import sha256_file

FEATURE_DIM = 2048
IMAGENET_WEIGHTS = (ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


class WeightsUnavailableError(RuntimeError):
    """No ImageNet weights on this machine and none could be downloaded; the message says where to put them."""


class WeightsFileError(ValueError):
    """A weights file that exists but is not a usable ResNet-50 state dict (corrupt, truncated, wrong model, bad hash)."""


# ---------------------------------------------------------------------------------------------- weight files


def hub_checkpoint_dir() -> Path:
    """torchvision's download cache: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file_name(weights: ResNet50_Weights = ResNet50_Weights.IMAGENET1K_V2) -> str:
    """The file name torchvision gives a weights enum's download, e.g. resnet50-11ad3fa6.pth."""
    return Path(weights.url).name


def unavailable_message() -> str:
    """The one sentence printed when no ImageNet weights can be found."""
    name = weights_file_name(IMAGENET_WEIGHTS[0])
    return (
        f"ImageNet ResNet-50 weights are not available: put {name} (from {IMAGENET_WEIGHTS[0].url}) in "
        f"{hub_checkpoint_dir()}, or pass --weights PATH to a torchvision-format ResNet-50 state dict."
    )


@lru_cache(maxsize=1)
def _reference_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        reference = resnet50(weights=None)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def check_resnet50_state_dict(state: Mapping[str, Any], source: str = "weights") -> dict[str, torch.Tensor]:
    """Validate a torchvision ResNet-50 state dict; return its backbone part (classifier keys dropped).

    Accepts checkpoints wrapped as {"state_dict": ...} or {"model": ...}, keys prefixed "module.", and conv1 with
    3 (RGB) or 1 (already grey) input channels. Raises WeightsFileError naming the first problem.
    """
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{source} does not hold a state dict (found {type(state).__name__}).")
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    cleaned = {str(k).removeprefix("module."): v for k, v in state.items()}
    reference = _reference_shapes()
    backbone = {k: v for k, v in cleaned.items() if not k.startswith("fc.")}
    expected = {k for k in reference if not k.startswith("fc.")}
    missing = sorted(expected - set(backbone))
    unexpected = sorted(set(backbone) - expected)
    if missing or unexpected:
        detail = f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else ""
        if unexpected:
            detail += ("; " if detail else "") + f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        raise WeightsFileError(f"{source} is not a torchvision ResNet-50 state dict: {detail}.")
    for key in sorted(expected):
        value = backbone[key]
        if not isinstance(value, torch.Tensor):
            raise WeightsFileError(f"{source}: '{key}' is not a tensor.")
        want = reference[key]
        if key == "conv1.weight" and tuple(value.shape) in ((64, 3, 7, 7), (64, 1, 7, 7)):
            continue
        if tuple(value.shape) != want:
            raise WeightsFileError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {want}.")
    for key, value in backbone.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsFileError(f"{source}: '{key}' contains NaN or infinite values.")
    return {k: v.detach().to("cpu") for k, v in backbone.items()}


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Load a local state dict with weights_only=True, check the hash in a torchvision-style name, keys and shapes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist.")
    digest = sha256_file(path)
    match = _HASH_IN_NAME.search(path.name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsFileError(
            f"weights file {path} fails its hash check: the name says {match.group(1)} but the SHA-256 starts "
            f"{digest[: len(match.group(1))]} (truncated or corrupt download?)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise WeightsFileError(
            f"weights file {path} is not a readable PyTorch state dict (truncated or not a weights file?): {reason}."
        ) from None
    backbone = check_resnet50_state_dict(state, source=f"weights file {path}")
    info = WeightsInfo(source="file", path=str(path), file_name=path.name, sha256=digest, hash_checked=bool(match))
    return backbone, info


def resolve_imagenet_weights(
    weights_path: Path | str | None = None, allow_download: bool = False
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The backbone state dict (fc dropped) from --weights PATH, else torchvision's cache (V2, then V1), else a
    download when allowed. Raises WeightsUnavailableError (one sentence) or WeightsFileError."""
    if weights_path is not None:
        return read_weights_file(Path(weights_path))
    for weights in IMAGENET_WEIGHTS:
        cached = hub_checkpoint_dir() / weights_file_name(weights)
        if cached.is_file():
            state, info = read_weights_file(cached)
            return state, info.model_copy(update={"source": "torch_hub_cache"})
    if allow_download:
        try:
            weights = IMAGENET_WEIGHTS[0]
            state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
        except Exception as error:  # noqa: BLE001 - offline, proxy, DNS, hash: all mean "not available"
            raise WeightsUnavailableError(f"{unavailable_message()} (download failed: {type(error).__name__})") from None
        cached = hub_checkpoint_dir() / weights_file_name(weights)
        backbone = check_resnet50_state_dict(state, source=str(cached))
        info = WeightsInfo(
            source="download", path=str(cached), file_name=cached.name, sha256=sha256_file(cached), hash_checked=True
        )
        return backbone, info
    raise WeightsUnavailableError(unavailable_message())


def load_imagenet_state_dict(weights_path: Path | str | None = None, allow_download: bool = False) -> dict[str, torch.Tensor]:
    """The checked backbone state dict only (see resolve_imagenet_weights)."""
    return resolve_imagenet_weights(weights_path, allow_download)[0]


# ------------------------------------------------------------------------------------------ grey conv1 folding


def sum_rgb_conv1(weight: torch.Tensor, std: tuple[float, ...] | None = None) -> torch.Tensor:
    """(O, 3, k, k) -> (O, 1, k, k): the sum over input channels, each divided by std[c] when given."""
    if weight.shape[1] == 1:
        return weight.clone()
    if std is None:
        return weight.sum(dim=1, keepdim=True)
    scale = torch.tensor(std, dtype=weight.dtype).view(1, -1, 1, 1)
    return (weight / scale).sum(dim=1, keepdim=True)


def fold_gray_normalisation(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RGB ResNet-50 backbone -> grey one fed (g - GRAY_MEAN)/GRAY_STD; exact on interior positions (module doc)."""
    folded = {k: v.clone() for k, v in state.items()}
    weight = folded["conv1.weight"].float()
    if weight.shape[1] == 1:
        return folded
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    folded["conv1.weight"] = (GRAY_STD * sum_rgb_conv1(weight, IMAGENET_STD)).to(state["conv1.weight"].dtype)
    offset = (weight * (GRAY_MEAN - mean) / std).sum(dim=(1, 2, 3))  # per output channel
    folded["bn1.running_mean"] = (folded["bn1.running_mean"].float() - offset).to(state["bn1.running_mean"].dtype)
    return folded


# ----------------------------------------------------------------------------------------------------- builders


def _new_head(num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(FEATURE_DIM, num_classes))


def _build(in_channels: int, num_classes: int, dropout: float, backbone: Mapping[str, torch.Tensor] | None) -> ResNet:
    # zero_init_residual: the last BN scale of every residual branch starts at 0 (each block starts as identity).
    model = resnet50(weights=None, zero_init_residual=backbone is None)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.fc = _new_head(num_classes, dropout)
    if backbone is not None:
        folded = fold_gray_normalisation(backbone)
        if in_channels != 1:
            raise ValueError("pretrained weights are folded to one input channel; in_channels must be 1.")
        missing, unexpected = model.load_state_dict(folded, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise WeightsFileError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return model


def build_resnet50(
    in_channels: int = 1,
    num_classes: int = 2,
    dropout: float = 0.0,
    weights: str | Path | Mapping[str, torch.Tensor] | None = None,
    allow_download: bool = False,
) -> ResNet:
    """torchvision ResNet-50 with a 1-channel stem and a new dropout + linear head.

    weights: None (random: Kaiming, zero-init residual BN), "imagenet" (torchvision cache / download), a path to a
    state dict file, or an already-loaded state dict.
    """
    if weights is None:
        return _build(in_channels, num_classes, dropout, None)
    if isinstance(weights, Mapping):
        backbone = check_resnet50_state_dict(weights)
    elif isinstance(weights, str) and weights == "imagenet":
        backbone = load_imagenet_state_dict(None, allow_download=allow_download)
    else:
        backbone = load_imagenet_state_dict(Path(weights))
    return _build(in_channels, num_classes, dropout, backbone)


def scratch_resnet50(num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The scratch arm: random init."""
    return build_resnet50(1, num_classes, dropout, None)


def pretrained_resnet50(backbone: Mapping[str, torch.Tensor], num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The imagenet arm: a checked backbone state dict (resolve_imagenet_weights) + a new head."""
    return build_resnet50(1, num_classes, dropout, backbone)


def feature_extractor(backbone: Mapping[str, torch.Tensor]) -> ResNet:
    """The imagenet-linear arm: the pretrained backbone returning 2048-d pooled features, frozen, in eval mode."""
    return as_feature_extractor(build_resnet50(1, 2, 0.0, backbone))


def as_feature_extractor(model: ResNet) -> ResNet:
    """`model` with fc replaced by Identity (2048-d pooled features out), every parameter frozen, in eval mode."""
    model.fc = nn.Identity()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def is_head_parameter(name: str) -> bool:
    """Parameters of the new classifier head (everything else is the backbone)."""
    return name.startswith("fc.")


def is_no_decay_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Norm scales/shifts and biases: 1-d tensors get no weight decay."""
    return parameter.ndim <= 1


def count_flops(model: nn.Module, image_size: int, in_channels: int, *, backward: bool = False, batch: int = 2) -> float:
    """FLOPs per image of one forward pass (and, with `backward`, its backward pass): the one FLOP counter.

    Counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; only matmul/conv-type ops are
    counted, so BatchNorm, ReLU, pooling and the optimizer step count 0). A convolution costs
    2 x C_in x C_out x k x k x H_out x W_out per image forward; its input gradient and its weight gradient cost the
    same again each. The pass runs on the model's device (the meta device makes it free: shapes only). Backward
    runs only if some parameter requires grad, and autograd computes only what the trainable parameters need: a
    frozen layer gets no weight gradient, a frozen prefix no backward at all, and the input never requires grad,
    so conv1 has no input gradient. Counted at `batch` (BatchNorm in train mode refuses a single value per channel)
    and divided by it: FLOPs are linear in the batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(batch, in_channels, image_size, image_size, device=device)
    needs_backward = backward and any(p.requires_grad for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        with torch.set_grad_enabled(needs_backward):
            out = model(x)
        if needs_backward:
            out.float().sum().backward()
    return counter.get_total_flops() / batch


@lru_cache(maxsize=16)
def forward_flops_per_image(image_size: int, in_channels: int = 1, num_classes: int = 2) -> float:
    """FLOPs of one forward pass of one image through the arms' ResNet-50 (count_flops on the meta device)."""
    with torch.device("meta"):
        model = _build(in_channels, num_classes, 0.0, None).eval()
    return count_flops(model, image_size, in_channels)


def describe_init(model: nn.Module) -> dict[str, float]:
    """A few numbers that identify an initialisation (for logs and tests)."""
    with torch.no_grad():
        return {
            "conv1_std": float(model.conv1.weight.std()),
            "layer1_bn3_weight_mean": float(model.layer1[0].bn3.weight.mean()),
            "fc_std": float(model.fc[-1].weight.std()) if isinstance(model.fc, nn.Sequential) else math.nan,
        }
