"""The supported torchvision models and what the builders and weight loaders need to know about each.

The per-model facts (torchvision builder, weights enums, where the stem, its BatchNorm, the head and the probe depths
are) live in _MODELS; data_schemas.arms.MODEL_NAMES lists the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    MobileNetV3,
    ResNet,
    ResNet18_Weights,
    ResNet50_Weights,
    WeightsEnum,
    mobilenet_v3_large,
    quantization as quantizable_models,
    resnet18,
    resnet50,
)

from data_schemas.arms import DEFAULT_MODEL, MODEL_LABELS, MODEL_NAMES

FEATURE_DIM = 2048  # ResNet-50's pooled feature width (feature_dim(model) for any model)


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
        quantizable_builder: torchvision's quantizable twin of `builder` (torchvision.models.quantization: the same
            modules and state-dict keys, plus quant/dequant stubs and FloatFunctional adds) for post-training int8.
        pooled_head: module path between the global pool and the head that a probe's pooled features skip ("" when
            the pool feeds the head directly).
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
    quantizable_builder: Callable[..., nn.Module] | None = None
    pooled_head: str = ""


RESNET_DEPTHS = ("layer2", "layer3", "layer4")
_ZERO_INIT_RESIDUAL = (("zero_init_residual", True),)  # each residual branch's last BN scale starts at 0: identity
_MODELS: dict[str, ModelDef] = {
    "resnet50": ModelDef(
        builder=resnet50, family=ResNet, weights=(ResNet50_Weights.IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V1),
        stem="conv1", stem_norm="bn1", head="fc", dropout_before_head="", probe_depths=RESNET_DEPTHS,
        scratch_kwargs=_ZERO_INIT_RESIDUAL, quantizable_builder=quantizable_models.resnet50,
    ),
    "resnet18": ModelDef(
        builder=resnet18, family=ResNet, weights=(ResNet18_Weights.IMAGENET1K_V1,),
        stem="conv1", stem_norm="bn1", head="fc", dropout_before_head="", probe_depths=RESNET_DEPTHS,
        scratch_kwargs=_ZERO_INIT_RESIDUAL, quantizable_builder=quantizable_models.resnet18,
    ),
    # Probe depths at strides 8, 16, 32 like ResNet's layer2-4: the last 40-, 112- and 960-channel blocks. The head
    # is the last Linear (1280 -> classes); the pretrained 960 -> 1280 Linear before it stays in the backbone.
    "mobilenet_v3_large": ModelDef(
        builder=mobilenet_v3_large, family=MobileNetV3,
        weights=(MobileNet_V3_Large_Weights.IMAGENET1K_V2, MobileNet_V3_Large_Weights.IMAGENET1K_V1),
        stem="features.0.0", stem_norm="features.0.1", head="classifier.3", dropout_before_head="classifier.2",
        probe_depths=("features.6", "features.12", "features.16"),
        quantizable_builder=quantizable_models.mobilenet_v3_large, pooled_head="classifier",
    ),
}
if tuple(_MODELS) != MODEL_NAMES:  # pragma: no cover - a model added on one side only
    raise RuntimeError("tasks.training.models._MODELS and data_schemas.arms.MODEL_NAMES must list the same models")
IMAGENET_WEIGHTS = _MODELS[DEFAULT_MODEL].weights


def model_def(model: str) -> ModelDef:
    """The registry entry of a supported model; ValueError listing the supported ones."""
    if model not in _MODELS:
        raise ValueError(f"unknown model {model!r}; supported models are {', '.join(MODEL_NAMES)}.")
    return _MODELS[model]


def model_label(model: str) -> str:
    """The model's name as people write it (ResNet-50, MobileNetV3-Large)."""
    return MODEL_LABELS[model]


def definition_of(net: nn.Module) -> ModelDef:
    """The registry entry a built network belongs to (by its torchvision class; the ResNets share their layout)."""
    for definition in _MODELS.values():
        if isinstance(net, definition.family):
            return definition
    raise ValueError(f"{type(net).__name__} is not one of the supported models ({', '.join(MODEL_NAMES)}).")
