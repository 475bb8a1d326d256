"""Builders for the arms' torchvision models (ResNet-50, ResNet-18, MobileNetV3-Large), their heads, features and
FLOP counts.

One private builder (_build) under small public ones (build_model, build_resnet50, build_resnet18,
build_mobilenet_v3_large, build_arm_model), as torchvision's resnet.py does. The per-model facts live in
tasks.training.model_defs; pretrained weights are found, checked and folded to the grey stem in
tasks.training.weights (see there for why the fold is exact).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn
from torchvision.models import MobileNetV3, ResNet

from data_schemas.arms import DEFAULT_MODEL, ArmSpec, parse_arm
from tasks.training.model_defs import RESNET_DEPTHS, definition_of, model_def
from tasks.training.weights import (
    WeightsFileError,
    check_state_dict,
    fold_gray_normalisation,
    load_imagenet_state_dict,
)

WeightsSource = Union[str, Path, Mapping[str, torch.Tensor], None]


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
    model: str, *, in_channels: int, num_classes: int, dropout: float, backbone: Mapping[str, torch.Tensor] | None,
    quantizable: bool = False,
) -> nn.Module:
    """torchvision `model` (or its quantizable twin) with an `in_channels` stem and a new dropout + linear head,
    random or from `backbone`."""
    definition = model_def(model)
    if backbone is not None and in_channels != 1:
        raise ValueError("pretrained weights are folded to one input channel; in_channels must be 1.")
    builder = definition.quantizable_builder if quantizable else definition.builder
    if builder is None:
        raise ValueError(f"torchvision has no quantizable {model}.")
    net = builder(weights=None, **dict(definition.scratch_kwargs if backbone is None else ()))
    _set_submodule(net, definition.stem, _grey_stem(net.get_submodule(definition.stem), in_channels))
    _set_submodule(
        net, definition.head, _new_head(net.get_submodule(definition.head).in_features, num_classes, dropout)
    )
    if definition.dropout_before_head:
        _set_submodule(net, definition.dropout_before_head, nn.Identity())  # the new head carries the dropout
    if backbone is not None:
        missing, unexpected = net.load_state_dict(fold_gray_normalisation(backbone, model), strict=False)
        if unexpected or any(not is_head_parameter(k, model) for k in missing):
            raise WeightsFileError(f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    return net


def build_model(
    model: str = DEFAULT_MODEL,
    *,
    num_classes: int = 2,
    in_channels: int = 1,
    dropout: float = 0.0,
    weights: WeightsSource = None,
    allow_download: bool = False,
    quantizable: bool = False,
) -> nn.Module:
    """A supported torchvision model with an `in_channels` stem and a new dropout + linear head.

    weights: None (random: torchvision's init, ResNets with zero-init residual BN), "imagenet" (torchvision cache /
    download), a path to a torchvision-format state dict file, or an already-checked backbone state dict. Pretrained
    weights get the grey stem fold (module doc). quantizable: torchvision's quantizable twin of the model (same
    state-dict keys), for post-training int8 (tasks.packaging.quantize).
    """
    if weights is None:
        backbone = None
    elif isinstance(weights, Mapping):
        backbone = check_state_dict(weights, model)
    elif isinstance(weights, str) and weights == "imagenet":
        backbone = load_imagenet_state_dict(None, allow_download=allow_download, model=model)
    else:
        backbone = load_imagenet_state_dict(Path(weights), model=model)
    return _build(model, in_channels=in_channels, num_classes=num_classes, dropout=dropout, backbone=backbone,
                  quantizable=quantizable)


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


def build_resnet18(
    *, num_classes: int = 2, in_channels: int = 1, dropout: float = 0.0, weights: WeightsSource = None
) -> ResNet:
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
    arm: ArmSpec | str,
    *,
    num_classes: int = 2,
    dropout: float = 0.0,
    backbone: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The model an arm trains: scratch -> random; imagenet -> `backbone` + new head; imagenet-linear -> the frozen
    feature extractor of `backbone`. `backbone` comes from resolve_imagenet_weights(path, model=arm.model)."""
    spec = parse_arm(arm)
    if spec.pretrained and backbone is None:
        raise ValueError(f"arm {spec.name!r} starts from ImageNet weights: pass "
                         "backbone=resolve_imagenet_weights(...)[0].")
    net = build_model(
        spec.model, num_classes=num_classes, dropout=dropout, weights=backbone if spec.pretrained else None
    )
    return as_feature_extractor(net) if spec.mode == "imagenet-linear" else net


def scratch_resnet50(num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The scratch arm: random init."""
    return build_resnet50(1, num_classes, dropout, None)


def pretrained_resnet50(backbone: Mapping[str, torch.Tensor], num_classes: int = 2, dropout: float = 0.0) -> ResNet:
    """The imagenet arm: a checked backbone state dict (resolve_imagenet_weights) + a new head."""
    return build_resnet50(1, num_classes, dropout, backbone)


def feature_extractor(backbone: Mapping[str, torch.Tensor], model: str = DEFAULT_MODEL) -> nn.Module:
    """The imagenet-linear arm: the pretrained backbone returning pooled features, frozen, in eval mode."""
    return as_feature_extractor(build_model(model, weights=backbone))


def pooled_at_depth(net: nn.Module, depth: str | None) -> nn.Module:
    """A feature extractor (as_feature_extractor) whose output is the global average of module `depth`'s output: the
    features a linear probe at that depth was fitted on (multi_depth_features). None means the deepest probe depth.

    The blocks after `depth`, up to the deepest probe depth, become Identity, so the model's own average pool reads
    `depth`'s output; so does the part between the pool and the head (MobileNetV3's 960 -> 1280 Linear), which the
    probe never saw. A ResNet at layer4 comes back unchanged (its pool feeds the head directly).
    """
    definition = definition_of(net)
    depths = definition.probe_depths
    depth = depth or depths[-1]
    if depth not in depths:
        raise ValueError(f"depth {depth!r} cannot be shipped; choose from {', '.join(depths)}.")
    parent_path, _, name = depth.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    names = [child for child, _ in parent.named_children()]
    last = depths[-1].rpartition(".")[2]
    for child in names[names.index(name) + 1 : names.index(last) + 1]:
        setattr(parent, child, nn.Identity())
    if definition.pooled_head:
        _set_submodule(net, definition.pooled_head, nn.Identity())
    return net


def as_feature_extractor(net: nn.Module) -> nn.Module:
    """`net` with its head replaced by Identity (pooled features out), every parameter frozen, in eval mode."""
    _set_submodule(net, definition_of(net).head, nn.Identity())
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net.eval()


@lru_cache(maxsize=8)
def feature_dim(model: str = DEFAULT_MODEL) -> int:
    """Width of the pooled features the head reads (ResNet-50 2048, ResNet-18 512, MobileNetV3-Large 1280)."""
    with torch.device("meta"):
        net = model_def(model).builder(weights=None)
    return int(net.get_submodule(model_def(model).head).in_features)


def is_head_parameter(name: str, model: str = DEFAULT_MODEL) -> bool:
    """Parameters of the new classifier head of `model` (everything else is the backbone)."""
    return name.startswith(model_def(model).head + ".")


def split_head_backbone(
    net: nn.Module, model: str = DEFAULT_MODEL
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


def count_flops(
    model: nn.Module, image_size: int, in_channels: int, *, backward: bool = False, batch: int = 2
) -> float:
    """FLOPs per image of one forward pass (and, with `backward`, its backward pass): the one FLOP counter.

    Counted by torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-add; only matmul/conv-type ops are
    counted, so BatchNorm, ReLU, pooling and the optimizer step count 0). A convolution costs
    2 x C_in/groups x C_out x k x k x H_out x W_out per image forward; its input gradient and its weight gradient cost
    the same again each (_conv_backward_flops corrects torch's count for grouped convolutions). The pass runs on the
    model's device (the meta device makes it free: shapes only). Backward
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
    image_size: int, in_channels: int = 1, num_classes: int = 2, model: str = DEFAULT_MODEL
) -> float:
    """FLOPs of one forward pass of one image through the arms' `model` (count_flops on the meta device)."""
    with torch.device("meta"):
        net = _build(model, in_channels=in_channels, num_classes=num_classes, dropout=0.0, backbone=None).eval()
    return count_flops(net, image_size, in_channels)


def describe_init(net: nn.Module) -> dict[str, float]:
    """A few numbers that identify an initialisation (for logs and tests): the stem's and the head's weight std."""
    definition = definition_of(net)
    head = net.get_submodule(definition.head)
    with torch.no_grad():
        return {
            "stem_std": float(net.get_submodule(definition.stem).weight.std()),
            "head_std": float(head[-1].weight.std()) if isinstance(head, nn.Sequential) else math.nan,
        }


# ------------------------------------------------------------------------------------- probes at several depths


def probe_depths(model: str = DEFAULT_MODEL) -> tuple[str, ...]:
    """The modules the linear probe reads, shallow to deep, at strides 8, 16 and 32 (ResNet: layer2, layer3, layer4)."""
    return model_def(model).probe_depths


@lru_cache(maxsize=8)
def depth_widths(model: str = DEFAULT_MODEL) -> dict[str, int]:
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
        raise ValueError(f"unknown depth {unknown[0] if unknown else '(none given)'!r}; e.g. "
                         f"{', '.join(RESNET_DEPTHS)}.")
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
