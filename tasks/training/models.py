"""Builders for the arms' torchvision models (ResNet-50, ResNet-18, MobileNetV3-Large) and loading/checking their
ImageNet weights (torchvision format, torchvision's weights enums).

Grey input. Every arm is fed z = (g - GRAY_MEAN) / GRAY_STD, with g the [0, 1] grey image. For the pretrained
arms the first convolution's RGB kernel is folded to one input channel so that the network computes what
torchvision's RGB network computes on the grey image replicated three times and normalised per channel with the
mean/std of the weights enum's transforms (ImageNet's):

    sum_c w_c * (g - mean_c) / std_c  =  [GRAY_STD * sum_c w_c / std_c] * z  +  sum_c w_c * (GRAY_MEAN - mean_c) / std_c

The first term is the new 1-channel kernel (the sum of the RGB kernels, each scaled by its channel's 1/std; with
equal stds it is exactly the plain sum of the RGB kernels). The second term is a per-output-channel constant; the
first conv of every supported model has no bias, but a BatchNorm comes next, so the constant is folded into that
BatchNorm's running mean. The result is exact wherever the first conv's window lies inside the image; only the
zero-padding border differs (the RGB network pads with each channel's mean, the grey one with GRAY_MEAN, which
differ by at most 0.04 in [0, 1] units). tests/test_models.py checks the equality on interior positions for every
model. The cost is a third of the replicated-RGB first conv.

One private builder (_build) under small public ones (build_model, build_resnet50, build_resnet18,
build_mobilenet_v3_large, build_arm_model), as torchvision's resnet.py does. The per-model facts (torchvision
builder, weights enums, where the stem, its BatchNorm, the head and the probe depths are) live in _MODELS.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    MobileNetV3,
    ResNet,
    ResNet18_Weights,
    ResNet50_Weights,
    mobilenet_v3_large,
    resnet18,
    WeightsEnum,
    resnet50,
)

from data_schemas.arms import LEGACY_MODEL, MODEL_LABELS, MODEL_NAMES, ArmSpec, parse_arm
from data_schemas.files import sha256_file
from data_schemas.training import GRAY_MEAN, GRAY_STD, WeightsInfo

FEATURE_DIM = 2048  # ResNet-50's pooled feature width (feature_dim(model) for any model)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")

WeightsSource = Union[str, Path, Mapping[str, torch.Tensor], None]


@dataclass(frozen=True)
class ModelDef:
    """What the builders need to know about one torchvision model.

    Args:
        builder: torchvision's builder function (weights=None is always passed: weights come from files).
        family: the torchvision class the builder returns.
        weights: its ImageNet weights enums, preferred first (the cache is searched in this order).
        stem: module path of the first convolution (the one folded to one input channel).
        stem_norm: module path of the BatchNorm right after it (receives the folded constant).
        head: module path of the layer torchvision's num_classes replaces: the new head goes there.
        dropout_before_head: module path of a Dropout the new head makes redundant (set to Identity), or "".
        probe_depths: modules whose pooled outputs the linear probe reads, shallow to deep (strides 8, 16, 32).
        scratch_kwargs: extra builder arguments for random initialisation.
    """

    builder: Callable[..., nn.Module]
    family: type
    weights: tuple[WeightsEnum, ...]
    stem: str
    stem_norm: str
    head: str
    dropout_before_head: str
    probe_depths: tuple[str, ...]
    scratch_kwargs: tuple[tuple[str, Any], ...] = ()


_RESNET_DEPTHS = ("layer2", "layer3", "layer4")
_ZERO_INIT_RESIDUAL = (("zero_init_residual", True),)  # each residual branch's last BN scale starts at 0: identity
_MODELS: dict[str, ModelDef] = {
    "resnet50": ModelDef(
        builder=resnet50, family=ResNet, weights=(ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1),
        stem="conv1", stem_norm="bn1", head="fc", dropout_before_head="", probe_depths=_RESNET_DEPTHS,
        scratch_kwargs=_ZERO_INIT_RESIDUAL,
    ),
    "resnet18": ModelDef(
        builder=resnet18, family=ResNet, weights=(ResNet18_Weights.IMAGENET1K_V1,),
        stem="conv1", stem_norm="bn1", head="fc", dropout_before_head="", probe_depths=_RESNET_DEPTHS,
        scratch_kwargs=_ZERO_INIT_RESIDUAL,
    ),
    # Probe depths at strides 8, 16, 32 like ResNet's layer2-4: the last 40-, 112- and 960-channel blocks. The head
    # is the last Linear (1280 -> classes); the pretrained 960 -> 1280 Linear before it stays in the backbone.
    "mobilenet_v3_large": ModelDef(
        builder=mobilenet_v3_large, family=MobileNetV3,
        weights=(MobileNet_V3_Large_Weights.IMAGENET1K_V2, MobileNet_V3_Large_Weights.IMAGENET1K_V1),
        stem="features.0.0", stem_norm="features.0.1", head="classifier.3", dropout_before_head="classifier.2",
        probe_depths=("features.6", "features.12", "features.16"),
    ),
}
if tuple(_MODELS) != MODEL_NAMES:  # pragma: no cover - a model added on one side only
    raise RuntimeError("tasks.training.models._MODELS and data_schemas.arms.MODEL_NAMES must list the same models")
IMAGENET_WEIGHTS = _MODELS[LEGACY_MODEL].weights


class WeightsUnavailableError(RuntimeError):
    """No ImageNet weights on this machine and none could be downloaded; the message says where to put them."""


class WeightsFileError(ValueError):
    """A weights file that exists but is not a usable state dict of the model (corrupt, truncated, wrong model, bad hash)."""


def model_def(model: str) -> ModelDef:
    """The registry entry of a supported model; ValueError listing the supported ones."""
    if model not in _MODELS:
        raise ValueError(f"unknown model {model!r}; supported models are {', '.join(MODEL_NAMES)}.")
    return _MODELS[model]


def _label(model: str) -> str:
    return MODEL_LABELS[model]


# ---------------------------------------------------------------------------------------------- weight files


def hub_checkpoint_dir() -> Path:
    """torchvision's download cache: $TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file_name(weights: WeightsEnum = ResNet50_Weights.IMAGENET1K_V2) -> str:
    """The file name torchvision gives a weights enum's download, e.g. resnet50-11ad3fa6.pth."""
    return Path(weights.url).name


def unavailable_message(model: str = LEGACY_MODEL) -> str:
    """The one sentence printed when no ImageNet weights of `model` can be found."""
    weights = model_def(model).weights[0]
    return (
        f"ImageNet {_label(model)} weights are not available: put {weights_file_name(weights)} (from {weights.url}) in "
        f"{hub_checkpoint_dir()}, or pass --weights PATH to a torchvision-format {_label(model)} state dict."
    )


@lru_cache(maxsize=8)
def _reference_shapes(model: str = LEGACY_MODEL) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        reference = model_def(model).builder(weights=None)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items()}


def _key_problems(backbone: Mapping[str, Any], expected: set[str]) -> str:
    """'missing n keys (e.g. ...); m unexpected keys (e.g. ...)', or '' when the key sets agree."""
    missing = sorted(expected - set(backbone))
    unexpected = sorted(set(backbone) - expected)
    detail = f"missing {len(missing)} keys (e.g. {missing[:3]})" if missing else ""
    if unexpected:
        detail += ("; " if detail else "") + f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
    return detail


def check_state_dict(
    state: Mapping[str, Any], model: str = LEGACY_MODEL, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Validate a torchvision state dict of `model`; return its backbone part (the head's keys dropped).

    Accepts checkpoints wrapped as {"state_dict": ...} or {"model": ...}, keys prefixed "module.", and a first conv
    with 3 (RGB) or 1 (already grey) input channels. Raises WeightsFileError naming the first problem.
    """
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"{source} does not hold a state dict (found {type(state).__name__}).")
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    definition, reference = model_def(model), _reference_shapes(model)
    head, stem = definition.head + ".", definition.stem + ".weight"
    cleaned = {str(k).removeprefix("module."): v for k, v in state.items()}
    backbone = {k: v for k, v in cleaned.items() if not k.startswith(head)}
    expected = {k for k in reference if not k.startswith(head)}
    problems = _key_problems(backbone, expected)
    if problems:
        raise WeightsFileError(f"{source} is not a torchvision {_label(model)} state dict: {problems}.")
    for key in sorted(expected):
        value, want = backbone[key], reference[key]
        if not isinstance(value, torch.Tensor):
            raise WeightsFileError(f"{source}: '{key}' is not a tensor.")
        grey_stem = key == stem and tuple(value.shape) == (want[0], 1, *want[2:])
        if tuple(value.shape) != want and not grey_stem:
            raise WeightsFileError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {want}.")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsFileError(f"{source}: '{key}' contains NaN or infinite values.")
    return {k: v.detach().to("cpu") for k, v in backbone.items()}


def check_resnet50_state_dict(state: Mapping[str, Any], source: str = "weights") -> dict[str, torch.Tensor]:
    """check_state_dict for ResNet-50."""
    return check_state_dict(state, LEGACY_MODEL, source)


def read_weights_file(path: Path, model: str = LEGACY_MODEL) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
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
    backbone = check_state_dict(state, model, source=f"weights file {path}")
    info = WeightsInfo(source="file", path=str(path), file_name=path.name, sha256=digest, hash_checked=bool(match))
    return backbone, info


def _download(model: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The preferred weights enum's download through torchvision (hash-checked); WeightsUnavailableError if it fails."""
    weights = model_def(model).weights[0]
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except Exception as error:  # noqa: BLE001 - offline, proxy, DNS, hash: all mean "not available"
        raise WeightsUnavailableError(f"{unavailable_message(model)} (download failed: {type(error).__name__})") from None
    cached = hub_checkpoint_dir() / weights_file_name(weights)
    backbone = check_state_dict(state, model, source=str(cached))
    info = WeightsInfo(
        source="download", path=str(cached), file_name=cached.name, sha256=sha256_file(cached), hash_checked=True
    )
    return backbone, info


def resolve_imagenet_weights(
    weights_path: Path | str | None = None, allow_download: bool = False, model: str = LEGACY_MODEL
) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """The backbone state dict of `model` (head dropped) from --weights PATH, else torchvision's cache (the weights
    enums in preference order), else a download when allowed. Raises WeightsUnavailableError (one sentence) or
    WeightsFileError."""
    if weights_path is not None:
        return read_weights_file(Path(weights_path), model)
    for weights in model_def(model).weights:
        cached = hub_checkpoint_dir() / weights_file_name(weights)
        if cached.is_file():
            state, info = read_weights_file(cached, model)
            return state, info.model_copy(update={"source": "torch_hub_cache"})
    if allow_download:
        return _download(model)
    raise WeightsUnavailableError(unavailable_message(model))


def load_imagenet_state_dict(
    weights_path: Path | str | None = None, allow_download: bool = False, model: str = LEGACY_MODEL
) -> dict[str, torch.Tensor]:
    """The checked backbone state dict only (see resolve_imagenet_weights)."""
    return resolve_imagenet_weights(weights_path, allow_download, model)[0]


# ------------------------------------------------------------------------------------------ grey stem folding


def sum_rgb_conv1(weight: torch.Tensor, std: Sequence[float] | None = None) -> torch.Tensor:
    """(O, 3, k, k) -> (O, 1, k, k): the sum over input channels, each divided by std[c] when given."""
    if weight.shape[1] == 1:
        return weight.clone()
    if std is None:
        return weight.sum(dim=1, keepdim=True)
    scale = torch.tensor(tuple(std), dtype=weight.dtype).view(1, -1, 1, 1)
    return (weight / scale).sum(dim=1, keepdim=True)


def input_statistics(model: str = LEGACY_MODEL) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel the pretrained weights expect: the weights enum's transforms metadata."""
    transforms = model_def(model).weights[0].transforms()
    return tuple(transforms.mean), tuple(transforms.std)


def fold_gray_normalisation(state: Mapping[str, torch.Tensor], model: str = LEGACY_MODEL) -> dict[str, torch.Tensor]:
    """RGB backbone -> grey one fed (g - GRAY_MEAN)/GRAY_STD; exact on interior positions (module doc)."""
    definition = model_def(model)
    conv_key, norm_key = definition.stem + ".weight", definition.stem_norm + ".running_mean"
    folded = {k: v.clone() for k, v in state.items()}
    weight = folded[conv_key].float()
    if weight.shape[1] == 1:
        return folded
    mean_rgb, std_rgb = input_statistics(model)
    std = torch.tensor(std_rgb).view(1, 3, 1, 1)
    mean = torch.tensor(mean_rgb).view(1, 3, 1, 1)
    folded[conv_key] = (GRAY_STD * sum_rgb_conv1(weight, std_rgb)).to(state[conv_key].dtype)
    offset = (weight * (GRAY_MEAN - mean) / std).sum(dim=(1, 2, 3))  # per output channel
    folded[norm_key] = (folded[norm_key].float() - offset).to(state[norm_key].dtype)
    return folded


# ----------------------------------------------------------------------------------------------------- builders


def _set_submodule(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _grey_stem(old: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The first conv with `in_channels` inputs, same geometry, Kaiming init (torchvision's conv init)."""
    conv = nn.Conv2d(
        in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _new_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Dropout(p=dropout), nn.Linear(in_features, num_classes))


def _build(
    model: str, *, in_channels: int, num_classes: int, dropout: float, backbone: Mapping[str, torch.Tensor] | None
) -> nn.Module:
    """torchvision `model` with an `in_channels` stem and a new dropout + linear head, random or from `backbone`."""
    definition = model_def(model)
    if backbone is not None and in_channels != 1:
        raise ValueError("pretrained weights are folded to one input channel; in_channels must be 1.")
    net = definition.builder(weights=None, **dict(definition.scratch_kwargs if backbone is None else ()))
    _set_submodule(net, definition.stem, _grey_stem(net.get_submodule(definition.stem), in_channels))
    _set_submodule(net, definition.head, _new_head(net.get_submodule(definition.head).in_features, num_classes, dropout))
    if definition.dropout_before_head:
        _set_submodule(net, definition.dropout_before_head, nn.Identity())  # the new head carries the dropout
    if backbone is not None:
        missing, unexpected = net.load_state_dict(fold_gray_normalisation(backbone, model), strict=False)
        if unexpected or any(not is_head_parameter(k, model) for k in missing):
            raise WeightsFileError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return net


def build_model(
    model: str = LEGACY_MODEL,
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    dropout: float = 0.0,
    weights: WeightsSource = None,
    allow_download: bool = False,
) -> nn.Module:
    """A supported torchvision model with an `in_channels` stem and a new dropout + linear head.

    weights: None (random: torchvision's init, ResNets with zero-init residual BN), "imagenet" (torchvision cache /
    download), a path to a torchvision-format state dict file, or an already-checked backbone state dict. Pretrained
    weights get the grey stem fold (module doc).
    """
    if weights is None:
        backbone = None
    elif isinstance(weights, Mapping):
        backbone = check_state_dict(weights, model)
    elif isinstance(weights, str) and weights == "imagenet":
        backbone = load_imagenet_state_dict(None, allow_download=allow_download, model=model)
    else:
        backbone = load_imagenet_state_dict(Path(weights), model=model)
    return _build(model, in_channels=in_channels, num_classes=num_classes, dropout=dropout, backbone=backbone)


def build_resnet50(
    in_channels: int = 1,
    num_classes: int = 2,
    dropout: float = 0.0,
    weights: WeightsSource = None,
    allow_download: bool = False,
) -> ResNet:
    """torchvision ResNet-50 with a 1-channel stem and a new dropout + linear head (build_model)."""
    return build_model(
        "resnet50", num_classes=num_classes, in_channels=in_channels, dropout=dropout, weights=weights,
        allow_download=allow_download,
    )


def build_resnet18(*, num_classes: int = 2, in_channels: int = 1, dropout: float = 0.0, weights: WeightsSource = None) -> ResNet:
    """torchvision ResNet-18 with a 1-channel stem and a new dropout + linear head (build_model)."""
    return build_model("resnet18", num_classes=num_classes, in_channels=in_channels, dropout=dropout, weights=weights)


def build_mobilenet_v3_large(
    *, num_classes: int = 2, in_channels: int = 1, dropout: float = 0.0, weights: WeightsSource = None
) -> MobileNetV3:
    """torchvision MobileNetV3-Large with a 1-channel stem; its last Linear becomes the dropout + linear head."""
    return build_model(
        "mobilenet_v3_large", num_classes=num_classes, in_channels=in_channels, dropout=dropout, weights=weights
    )


def build_arm_model(
    arm: ArmSpec | str, *, num_classes: int = 2, dropout: float = 0.0, backbone: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """The model an arm trains: scratch -> random; imagenet -> `backbone` + new head; imagenet-linear -> the frozen
    feature extractor of `backbone`. `backbone` comes from resolve_imagenet_weights(path, model=arm.model)."""
    spec = parse_arm(arm)
    if spec.pretrained and backbone is None:
        raise ValueError(f"arm {spec.name!r} starts from ImageNet weights: pass backbone=resolve_imagenet_weights(...)[0].")
    net = build_model(spec.model, num_classes=num_classes, dropout=dropout, weights=backbone if spec.pretrained else None)
    return as_feature_extractor(net) if spec.mode == "imagenet-linear" else net


def scratch_resnet50(num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The scratch arm: random init."""
    return build_resnet50(1, num_classes, dropout, None)


def pretrained_resnet50(backbone: Mapping[str, torch.Tensor], num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The imagenet arm: a checked backbone state dict (resolve_imagenet_weights) + a new head."""
    return build_resnet50(1, num_classes, dropout, backbone)


def feature_extractor(backbone: Mapping[str, torch.Tensor], model: str = LEGACY_MODEL) -> nn.Module:
    """The imagenet-linear arm: the pretrained backbone returning pooled features, frozen, in eval mode."""
    return as_feature_extractor(build_model(model, weights=backbone))


def pooled_at_depth(net: nn.Module, depth: str | None) -> nn.Module:
    """A ResNet feature extractor whose pooled output is the global average of stage `depth`'s output: the features a
    linear probe at that depth was fitted on (multi_depth_features). The stages after `depth` become Identity, so
    ResNet's own average pool reads `depth`'s output. None or layer4: `net` unchanged."""
    if depth in (None, _RESNET_DEPTHS[-1]):
        return net
    if depth not in _RESNET_DEPTHS:
        raise ValueError(f"depth {depth!r} cannot be shipped; choose from {', '.join(_RESNET_DEPTHS)}.")
    for stage in _RESNET_DEPTHS[_RESNET_DEPTHS.index(depth) + 1:]:
        setattr(net, stage, nn.Identity())
    return net


def _definition_of(net: nn.Module) -> ModelDef:
    """The registry entry a built network belongs to (by its torchvision class; the ResNets share their layout)."""
    for definition in _MODELS.values():
        if isinstance(net, definition.family):
            return definition
    raise ValueError(f"{type(net).__name__} is not one of the supported models ({', '.join(MODEL_NAMES)}).")


def as_feature_extractor(net: nn.Module) -> nn.Module:
    """`net` with its head replaced by Identity (pooled features out), every parameter frozen, in eval mode."""
    _set_submodule(net, _definition_of(net).head, nn.Identity())
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.eval()


@lru_cache(maxsize=8)
def feature_dim(model: str = LEGACY_MODEL) -> int:
    """Width of the pooled features the head reads (ResNet-50 2048, ResNet-18 512, MobileNetV3-Large 1280)."""
    with torch.device("meta"):
        net = model_def(model).builder(weights=None)
    return int(net.get_submodule(model_def(model).head).in_features)


def is_head_parameter(name: str, model: str = LEGACY_MODEL) -> bool:
    """Parameters of the new classifier head of `model` (everything else is the backbone)."""
    return name.startswith(model_def(model).head + ".")


def split_head_backbone(
    net: nn.Module, model: str = LEGACY_MODEL
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(head, backbone) named parameters of a built `model`: head warm-up trains the first, discriminative learning
    rates give the second a smaller rate."""
    head, backbone = [], []
    for name, parameter in net.named_parameters():
        (head if is_head_parameter(name, model) else backbone).append((name, parameter))
    return head, backbone


def is_no_decay_parameter(name: str, parameter: torch.Tensor) -> bool:
    """Norm scales/shifts and biases: 1-d tensors get no weight decay."""
    return parameter.ndim <= 1


def _conv_backward_flops(
    grad_out_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int], _bias: Any, _stride: Any,
    _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, _groups: int, output_mask: Sequence[bool],
    out_shape: Any, **_: Any,
) -> int:
    """FLOPs of a convolution's backward: its forward count once for the input gradient and once for the weight
    gradient (each pairs every forward multiply-add with one of its own), as requested by output_mask.

    Replaces torch.utils.flop_counter's conv_backward_flop, whose weight-gradient term ignores `groups` and so
    counts a depthwise convolution's weight gradient `groups` times too high (MobileNetV3's training would read
    ~28x its forward; pytorch/pytorch PR 183405 fixes it upstream). For groups = 1 the two agree exactly.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(model: nn.Module, image_size: int, in_channels: int, *, backward: bool = False, batch: int = 2) -> float:
    """FLOPs per image of one forward pass (and, with `backward`, its backward pass): the one FLOP counter.

    Counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; only matmul/conv-type ops are
    counted, so BatchNorm, ReLU, pooling and the optimizer step count 0). A convolution costs
    2 x C_in/groups x C_out x k x k x H_out x W_out per image forward; its input gradient and its weight gradient cost
    the same again each (_conv_backward_flops corrects torch's count for grouped convolutions). The pass runs on the model's device (the meta device makes it free: shapes only). Backward
    runs only if some parameter requires grad, and autograd computes only what the trainable parameters need: a
    frozen layer gets no weight gradient, a frozen prefix no backward at all, and the input never requires grad,
    so conv1 has no input gradient. Counted at `batch` (BatchNorm in train mode refuses a single value per channel)
    and divided by it: FLOPs are linear in the batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x = torch.zeros(batch, in_channels, image_size, image_size, device=device)
    needs_backward = backward and any(p.requires_grad for p in model.parameters())
    corrected = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        with torch.set_grad_enabled(needs_backward):
            out = model(x)
        if needs_backward:
            out.float().sum().backward()
    return counter.get_total_flops() / batch


@lru_cache(maxsize=32)
def forward_flops_per_image(
    image_size: int, in_channels: int = 1, num_classes: int = 2, model: str = LEGACY_MODEL
) -> float:
    """FLOPs of one forward pass of one image through the arms' `model` (count_flops on the meta device)."""
    with torch.device("meta"):
        net = _build(model, in_channels=in_channels, num_classes=num_classes, dropout=0.0, backbone=None).eval()
    return count_flops(net, image_size, in_channels)


def describe_init(net: nn.Module) -> dict[str, float]:
    """A few numbers that identify an initialisation (for logs and tests): the stem's and the head's weight std."""
    definition = _definition_of(net)
    head = net.get_submodule(definition.head)
    with torch.no_grad():
        return {
            "stem_std": float(net.get_submodule(definition.stem).weight.std()),
            "head_std": float(head[-1].weight.std()) if isinstance(head, nn.Sequential) else math.nan,
        }


# ------------------------------------------------------------------------------------- probes at several depths


def probe_depths(model: str = LEGACY_MODEL) -> tuple[str, ...]:
    """The modules the linear probe reads, shallow to deep, at strides 8, 16 and 32 (ResNet: layer2, layer3, layer4)."""
    return model_def(model).probe_depths


@lru_cache(maxsize=8)
def depth_widths(model: str = LEGACY_MODEL) -> dict[str, int]:
    """Channels of each probe depth's output (= the width of its pooled features), from a meta-device pass."""
    with torch.device("meta"):
        net = _build(model, in_channels=1, num_classes=2, dropout=0.0, backbone=None).eval()
        features = multi_depth_features(net, torch.zeros(1, 1, 64, 64), probe_depths(model))
    return {depth: int(value.shape[1]) for depth, value in features.items()}


def multi_depth_features(net: nn.Module, x: torch.Tensor, depths: Sequence[str]) -> dict[str, torch.Tensor]:
    """{depth: (N, C_depth) globally average-pooled output of module `depth`} from ONE forward pass of `x`.

    Forward hooks catch each named module's output; the pass runs as the caller set it up (no_grad/inference
    mode, autocast, train/eval). Features come back in `depths`' order, as float32. ValueError on an unknown name.
    """
    modules = dict(net.named_modules())
    unknown = [d for d in depths if d not in modules]
    if unknown or not depths:
        raise ValueError(f"unknown depth {unknown[0] if unknown else '(none given)'!r}; e.g. {', '.join(_RESNET_DEPTHS)}.")
    pooled: dict[str, torch.Tensor] = {}

    def hook_for(depth: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            pooled[depth] = output.float().mean(dim=(2, 3))

        return hook

    handles = [modules[depth].register_forward_hook(hook_for(depth)) for depth in depths]
    try:
        net(x)
    finally:
        for handle in handles:
            handle.remove()
    return {depth: pooled[depth] for depth in depths}


# ------------------------------------------------------------------------------------------------- input sizes


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) [0, 1] images -> (N, C, size, size): the one resize to a smaller training size.

    Antialiased bicubic (F.interpolate mode="bicubic", antialias=True, align_corners=False: with antialias the
    cubic kernel is widened by the scale factor, so a 4x shrink averages every input pixel, like PIL's BICUBIC
    resize), applied once to the images ingested at the largest size, then clamped to [0, 1] because the cubic
    kernel's negative lobes overshoot at edges. data_schemas.arms.RESIZE_METHOD is its description for the
    dataset card. Images already at `size` come back unchanged.
    """
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = images.float()
    resized = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp_(0.0, 1.0)
