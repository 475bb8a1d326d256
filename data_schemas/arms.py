"""An arm is (model, mode): which torchvision classification network, and how it is trained.

Names. "model:mode", e.g. "resnet18:imagenet" or "mobilenet_v3_large:scratch". The bare names "scratch",
"imagenet" and "imagenet-linear" mean ResNet-50 and stay the canonical names of the ResNet-50 arms, so existing
commands, deployments, run folders and cost.json files keep their meaning ("resnet50:scratch" is accepted and
canonicalised to "scratch").

Models. ResNet-50 (the reference), ResNet-18 (the small ResNet) and MobileNetV3-Large, the mobile-class network.
MobileNetV3-Large rather than EfficientNet-B0: it was designed by a latency search on mobile CPUs (Howard et al.
2019, "Searching for MobileNetV3"), which is the deployment question asked (a fast forward pass without a GPU);
it costs about 0.22 G multiply-adds at 224 px against EfficientNet-B0's 0.39 G; and it has no stochastic depth,
so fine-tuning it needs no regulariser the other arms lack.

Modes. scratch (random init, every layer trained), imagenet (ImageNet weights, fine-tuned with the head warm-up
and discriminative learning rates), imagenet-linear (frozen ImageNet features, logistic regression on top).
"""

from __future__ import annotations

from typing import Annotated, Iterable, Literal, get_args

from pydantic import AfterValidator, ConfigDict, Field

from data_schemas.base import StrictModel

ModelName = Literal["resnet50", "resnet18", "mobilenet_v3_large"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
ArmMode = Literal["scratch", "imagenet", "imagenet-linear"]
ARM_MODES: tuple[str, ...] = get_args(ArmMode)
DEFAULT_MODEL = "resnet50"  # the model a bare mode name ("scratch") means
# The ResNet-50 arms' names (= the modes); any arm, e.g. "resnet18:imagenet", validates through parse_arm.
ArmName = ArmMode
ARM_NAMES: tuple[str, ...] = ARM_MODES
# The smallest square input any arm is priced, trained or ingested at: the networks downsample by 32 (total stride),
# so a smaller input reaches their last stage as a 1x1 map made mostly of zero padding.
MIN_IMAGE_SIZE = 32
PRETRAINED_MODES: tuple[str, ...] = ("imagenet", "imagenet-linear")

# Every arm by its canonical name: the bare modes (ResNet-50), then MODEL:MODE for each other model.
ARM_CHOICES: tuple[str, ...] = ARM_MODES + tuple(
    f"{model}:{mode}" for model in MODEL_NAMES if model != DEFAULT_MODEL for mode in ARM_MODES)

MODEL_LABELS: dict[str, str] = {
    "resnet50": "ResNet-50",
    "resnet18": "ResNet-18",
    "mobilenet_v3_large": "MobileNetV3-Large",
}
MODE_DESCRIPTIONS: dict[str, str] = {
    "scratch": "{label} from random initialisation, every layer trained",
    "imagenet": "{label} from ImageNet weights, fully fine-tuned (optional head-only warm-up epochs first)",
    "imagenet-linear": "frozen ImageNet {label}: one forward pass for pooled features, then logistic regression",
}

# The one resize from the ingested size to a smaller training size (tasks.training.models.resize_images implements it).
RESIZE_METHOD = (
    "antialiased bicubic (torch.nn.functional.interpolate mode='bicubic', antialias=True, align_corners=False), "
    "once, from the images ingested at the largest size, clamped to [0, 1]"
)


class ArmSpec(StrictModel):
    """One arm: a supported torchvision model trained in one mode.

    Args:
        model: the torchvision classification model (MODEL_NAMES).
        mode: scratch | imagenet | imagenet-linear.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName = Field(default=DEFAULT_MODEL, description="torchvision model builder name")
    mode: ArmMode

    @property
    def name(self) -> str:
        """The canonical arm name: the bare mode for ResNet-50 (legacy names), else 'model:mode'."""
        return self.mode if self.model == DEFAULT_MODEL else f"{self.model}:{self.mode}"

    @property
    def pretrained(self) -> bool:
        """True when the arm starts from ImageNet weights."""
        return self.mode in PRETRAINED_MODES

    @property
    def description(self) -> str:
        """One line for tables and reports."""
        return MODE_DESCRIPTIONS[self.mode].format(label=MODEL_LABELS[self.model])

    def __str__(self) -> str:
        return self.name


def _invalid_arm(text: str, reason: str) -> ValueError:
    """The one sentence a wrong arm name gets: what is wrong and every valid choice."""
    return ValueError(
        f"unknown arm {text!r} ({reason}); an arm is MODEL:MODE or a bare MODE (meaning {DEFAULT_MODEL}), "
        f"with MODEL one of {', '.join(MODEL_NAMES)} and MODE one of {', '.join(ARM_MODES)}."
    )


def parse_arm(text: str | ArmSpec) -> ArmSpec:
    """'resnet18:imagenet' -> ArmSpec(resnet18, imagenet); a bare mode means ResNet-50. ValueError lists the choices."""
    if isinstance(text, ArmSpec):
        return text
    if not isinstance(text, str):
        raise _invalid_arm(str(text), "not a string")
    cleaned = text.strip().lower()
    model, sep, mode = cleaned.rpartition(":")
    model = model if sep else DEFAULT_MODEL
    if model not in MODEL_NAMES:
        raise _invalid_arm(text, f"no model {model!r}")
    if mode not in ARM_MODES:
        raise _invalid_arm(text, f"no mode {mode!r}")
    return ArmSpec(model=model, mode=mode)


def canonical_arm_name(text: str | ArmSpec) -> str:
    """The canonical name of an arm given in any accepted spelling ('resnet50:scratch' -> 'scratch')."""
    return parse_arm(text).name


# A model field holding an arm: any accepted spelling is stored under its canonical name.
CanonicalArm = Annotated[str, AfterValidator(canonical_arm_name)]


def parse_arms(texts: Iterable[str | ArmSpec]) -> list[ArmSpec]:
    """Every arm parsed, in order; ValueError on a bad name or on one arm listed twice (in any spelling)."""
    specs = [parse_arm(text) for text in texts]
    names = [spec.name for spec in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each arm may be listed once; repeated: {', '.join(repeated)}.")
    return specs


def default_arms() -> list[ArmSpec]:
    """Today's three ResNet-50 arms, the default of every command."""
    return [ArmSpec(model=DEFAULT_MODEL, mode=mode) for mode in ARM_MODES]
