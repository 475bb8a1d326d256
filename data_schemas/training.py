"""Schemas of the training stage: profiles and arm configs (inputs), and every file a run writes (outputs).

A run folder (one arm, one fold) holds, all validated by the classes below:
    config.json         RunConfig: the resolved config (profile + arm defaults + --set overrides), seed, dataset
                        hash, split file hash, weights identity, device, precision, and its own config_hash
    metrics.csv         EpochMetrics rows, one per finished epoch (rewritten atomically from the checkpoint)
    checkpoint_last.pt  torch checkpoint after every finished epoch (atomic; model, optimizer, step, history,
                        early-stopping state, best weights when they are not the current ones); removed once the
                        run is completed (a completed run is not resumed)
    best.pt             {"state_dict", "epoch", "val_auc", "val_loss", "config_hash", "arm", "classes"}: weights
                        of the best epoch (chosen by TrainConfig.early_stopping_monitor)
    predictions.csv     PredictionRow per test image (hashed keys only), from the best epoch's weights
    val_predictions.csv PredictionRow per validation image, same weights: the operating point is chosen on it
    timing.json         TimingInfo
    linear_model.json   LinearProbeModel (imagenet-linear arm only): the probe of the chosen depth
    probe_depths.json   ProbeDepths (imagenet-linear arm only): validation and test AUC of a probe at every depth,
                        and the depth chosen by validation AUC
    status.json         RunSummary; written last. Only status == "completed" means the outputs are final.

The split file (splits.csv, SplitRow rows, plus splits.json, SplitsInfo) is shared by every arm of a comparison;
the run plan (plan.json beside it, data_schemas/plan.py) holds every run's resolved TrainConfig.
Profiles live in profiles.json beside this file: {"profile": {"base": {...}, "arms": {"arm": {...}}}}; any key can
be overridden with `--set key=value` (dotted for nested keys, e.g. augment.rotate_deg=5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from data_schemas.arms import (  # noqa: F401 - re-exported: the ResNet-50 arms
    ARM_NAMES,
    MIN_IMAGE_SIZE,
    RESIZE_METHOD,
    ArmName,
    CanonicalArm,
    canonical_arm_name,
    parse_arm,
)
from data_schemas.base import StrictModel

MAX_IMAGE_SIZE = 1024  # the largest square image a dataset is ingested or an arm trained at

TRAINING_SCHEMA_VERSION = "1.0"
SPLITS_SCHEMA_VERSION = "1.0"

PROFILES_FILE = Path(__file__).with_name("profiles.json")
ProfileName = Literal["smoke", "cpu", "full"]  # the one list of profile names; profiles.json must define each
PROFILE_NAMES: tuple[str, ...] = get_args(ProfileName)
PRETRAINED_ARMS: tuple[str, ...] = ("imagenet", "imagenet-linear")  # the modes; any arm: parse_arm(arm).pretrained

SPLITS_FILE = "splits.csv"
SPLITS_INFO_FILE = "splits.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.csv"
CHECKPOINT_FILE = "checkpoint_last.pt"
BEST_FILE = "best.pt"
PREDICTIONS_FILE = "predictions.csv"
VAL_PREDICTIONS_FILE = "val_predictions.csv"  # PredictionRow per validation image: the operating point is chosen on it
TIMING_FILE = "timing.json"
STATUS_FILE = "status.json"
LINEAR_MODEL_FILE = "linear_model.json"
FEATURES_FILE = "features.npz"
PROBE_DEPTHS_FILE = "probe_depths.json"
# OverfittingLossRow per image: training (eval subsample) and validation losses at the chosen and the last epoch
OVERFITTING_LOSSES_FILE = "overfitting_losses.csv"

# Grey-level input normalisation used by every arm: the mean of ImageNet's per-channel means and stds. The
# pretrained conv1 is folded so that, on every position whose 7x7 window lies inside the image, it computes
# exactly what the RGB network computes on the grey image replicated to 3 channels and normalised per channel.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
GRAY_MEAN: float = sum(IMAGENET_MEAN) / 3
GRAY_STD: float = sum(IMAGENET_STD) / 3


# ------------------------------------------------------------------------------------------------ configuration


class AugmentConfig(StrictModel):
    """Batched on-the-fly augmentation (one affine warp per batch on the in-memory tensor)."""

    enabled: bool = True
    rotate_deg: float = Field(default=10.0, ge=0, le=180, description="uniform rotation in +-rotate_deg")
    scale_min: float = Field(default=0.9, gt=0)
    scale_max: float = Field(default=1.1, gt=0)
    translate: float = Field(default=0.05, ge=0, le=0.5, description="shift as a fraction of the image size")
    hflip: bool = Field(default=False, description="left-right flip; off by default: CT left/right is anatomical")
    brightness: float = Field(default=0.05, ge=0, description="additive intensity jitter, +-brightness")
    contrast: float = Field(default=0.1, ge=0, description="multiplicative contrast jitter around the image mean")
    noise_std: float = Field(default=0.01, ge=0, description="Gaussian noise std (in [0, 1] intensity units)")


class LinearProbeConfig(StrictModel):
    """The imagenet-linear arm: logistic regression on frozen 2048-d features."""

    Cs: int = Field(default=10, ge=1, description="number of C values on a log grid (LogisticRegressionCV)")
    cv_folds: int = Field(default=5, ge=2, description="patient-grouped CV folds for choosing C")
    max_iter: int = Field(default=2000, ge=10)
    depths: list[str] | None = Field(
        default=None,
        description="modules whose pooled outputs are probed, e.g. [\"layer4\"]; None: every probe depth of the model "
        "(tasks.training.models.probe_depths: ResNet layer2, layer3, layer4), the best chosen on validation AUC",
    )


class TrainConfig(StrictModel):
    """Every hyper-parameter and overfitting control of one arm; recorded whole in config.json."""

    image_size: int = Field(ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="training input size in pixels: the "
                            "ingested images are resized once, in memory, to image_size x image_size")
    epochs: int = Field(ge=1, description="maximum epochs (early stopping may end sooner)")
    batch_size: int = Field(ge=2)
    eval_batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(gt=0, description="peak learning rate of the head (and of the backbone for scratch)")
    backbone_lr_mult: float = Field(default=1.0, ge=0, description="backbone lr = lr * backbone_lr_mult")
    freeze_epochs: int = Field(default=0, ge=0, description="head-only warm-up epochs (fastai fine_tune)")
    weight_decay: float = Field(default=0.05, ge=0, description="not applied to norm and bias parameters")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = Field(default=1.0, ge=0, description="linear warm-up at the start of each phase")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    dropout: float = Field(default=0.2, ge=0, lt=1, description="dropout before the classifier")
    class_balance: Literal["none", "loss_weights", "sampler"] = "loss_weights"
    mixup_alpha: float = Field(default=0.0, ge=0, description="0 disables mixup")
    early_stopping_patience: int | None = Field(default=3, ge=1, description="None disables early stopping")
    early_stopping_min_delta: float = Field(default=0.0, ge=0)
    early_stopping_monitor: Literal["val_loss", "val_auc_ema"] = Field(
        default="val_loss",
        description="quantity that selects the best epoch and stops training: plain validation cross-entropy "
        "(stable on small validation sets) or an exponential moving average of validation AUC",
    )
    min_epochs: int = Field(default=3, ge=1, description="no early stop before this many epochs (capped at epochs)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    linear: LinearProbeConfig = Field(default_factory=LinearProbeConfig)
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    train_fraction: float = Field(default=1.0, gt=0, le=1, description="share of training patients used "
                                                                       "(data-efficiency curves)")
    test_fraction: float = Field(default=0.15, gt=0, lt=1)
    positive_label: str | None = Field(default=None, description="None: the other label of one named like "
                                                                 "normal/negative/benign/0, else the last sorted label")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None keeps torch's default")
    download_weights: bool = Field(default=True, description="try torchvision's download when the cache is empty")

    @model_validator(mode="after")
    def _split_leaves_training_patients(self) -> TrainConfig:
        """Validation and test patients together must leave some patients for training."""
        check_split_fractions(self.val_fraction, self.test_fraction)
        return self


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """ValueError (one sentence) unless val_fraction + test_fraction < 1, i.e. some patients are left to train on."""
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be below 1 so that some patients are left for training, "
                         f"got {val_fraction:g} + {test_fraction:g} = {val_fraction + test_fraction:g}")


class ProfileSpec(StrictModel):
    """One profile in profiles.json: base values, then per-arm values on top."""

    description: str = ""
    base: dict[str, Any]
    arms: dict[str, dict[str, Any]] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict, description="EvaluationSettings defaults of this profile")


class WeightsInfo(StrictModel):
    """Where the pretrained weights of a run came from."""

    source: Literal["file", "torch_hub_cache", "download"]
    path: str
    file_name: str
    sha256: str
    hash_checked: bool = Field(description="True when the file name carries a hash prefix and it matched")



class WeightsCheck(StrictModel):
    """One passed check of a weights file (tasks.training.weights_record): the file's identity when checked
    (resolved path, device, inode, size, mtime_ns, ctime_ns), the checking code's identity and what it found."""

    identity: tuple[str, int, int, int, int, int]
    checker: str
    sha256: str
    hash_checked: bool


class WeightsChecks(StrictModel):
    """weights_checks.json in the cache folder: passed checks keyed '<model> <resolved path>'."""

    schema_version: Literal["1.0"] = "1.0"
    checks: dict[str, WeightsCheck] = Field(default_factory=dict)


class HardwareProbe(StrictModel):
    """runtime_probe.json in the cache folder: what torch said about this machine's hardware (tasks.common.runtime),
    and the key (torch's installation, CPU, GPU device nodes and driver, GPU variables) it holds for."""

    schema_version: Literal["1.0"] = "1.0"
    key: str
    cuda: bool
    cuda_bf16: bool
    cpu_fast_bf16: bool

class RunConfig(StrictModel):
    """config.json of one run."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    arm: CanonicalArm = Field(description="canonical arm name (data_schemas.arms): 'scratch', 'resnet18:imagenet', ...")
    profile: str
    overrides: dict[str, str] = Field(default_factory=dict, description="--set key=value pairs as given")
    seed: int
    fold: int = Field(ge=0, description="the outer fold whose patients are this run's test part (0 in hold-out mode)")
    folds: int = Field(ge=1, description="outer folds of the split (1 in hold-out mode)")
    train: TrainConfig
    dataset_hash: str
    dataset_image_size: int
    resize_method: str = Field(
        default=RESIZE_METHOD, description="how the ingested images were brought to train.image_size (once, in memory)",
    )
    splits_path: str
    splits_sha256: str
    classes: list[str] = Field(description="[negative, positive] label names")
    positive_label: str
    n_train_images: int
    n_val_images: int
    n_test_images: int
    n_train_patients: int
    n_val_patients: int
    n_test_patients: int
    patient_overlap: int = Field(description="patients found in two parts (checked; must be 0)")
    model_selection: str = Field(default="", description="which quantity chose the best epoch and stopped training, "
                                                         "and why")
    weights: WeightsInfo | None = None
    device: str
    precision: Literal["fp32", "bf16", "fp16"]
    channels_last: bool
    num_threads: int
    torch_version: str
    torchvision_version: str
    config_hash: str = Field(description="SHA-256 of everything above except run-local paths: the run's identity")
    created_at: str


# ------------------------------------------------------------------------------------------------------ outputs


class EpochMetrics(StrictModel):
    """One row of metrics.csv; a loss or rate that is NaN or infinite (a diverged epoch) is recorded as None."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    epoch: int = Field(ge=1)
    phase: Literal["head", "full", "linear"]
    train_loss: float | None = None
    val_loss: float | None = None
    train_eval_loss: float | None = Field(
        default=None,
        description="plain cross-entropy in eval mode, no augmentation, no smoothing or class weights, on a fixed "
        "subsample of at most 512 training images (the same images every epoch of a run): the like-for-like "
        "partner of val_loss for the overfitting gap",
    )
    val_auc: float | None = Field(default=None, description="None when the validation part has a single class")
    lr_head: float | None = None
    lr_backbone: float | None = None
    images_per_second: float | None = Field(default=None, description="training images per second this epoch")
    epoch_seconds: float
    elapsed_seconds: float = Field(description="training wall time since the run first started, across resumes")
    is_best: bool

    @field_validator("train_loss", "val_loss", "train_eval_loss", "val_auc", "images_per_second", mode="before")
    @classmethod
    def _undefined_is_none(cls, value: Any) -> Any:
        """A diverged epoch's NaN or infinite value is recorded as undefined (None): the run goes on to report it."""
        return None if isinstance(value, float) and not math.isfinite(value) else value


class PredictionRow(StrictModel):
    """One row of predictions.csv (a test image) or val_predictions.csv (a validation image)."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    image_key: str
    patient_key: str
    label: str
    target: int = Field(ge=0, le=1, description="1 for the positive label")
    prob_positive: float = Field(ge=0, le=1)


class OverfittingLossRow(StrictModel):
    """One row of overfitting_losses.csv: one image's plain cross-entropy (eval mode, no smoothing or class weights)
    at the chosen or the last epoch, in the training subsample behind train_eval_loss or in the validation part.

    The overfitting gap of an epoch is the mean validation loss minus the mean training loss; the patient keys let
    the evaluation bootstrap it by patient.
    """

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    epoch: int = Field(ge=1)
    role: Literal["chosen", "last"] = Field(description="the epoch chosen by model selection, or the last one trained")
    part: Literal["train", "val"]
    patient_key: str
    loss: float = Field(ge=0)


class TimingInfo(StrictModel):
    """timing.json."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    wall_seconds: float = Field(description="whole run, this invocation plus resumed ones (training + eval)")
    train_seconds: float = Field(description="time inside training epochs")
    eval_seconds: float
    feature_seconds: float | None = Field(default=None, description="imagenet-linear: the feature pass")
    epochs_run: int
    train_images_seen: int
    images_per_second: float = Field(description="training images per second (imagenet-linear: feature pass)")
    forward_flops_per_image: float = Field(description="FlopCounterMode count at the run's image size")
    train_flops_per_image: float = Field(description="3x forward for a training step; forward only for linear")
    achieved_flops_per_second: float
    device: str
    precision: str


class LinearProbeModel(StrictModel):
    """linear_model.json: the fitted standardiser + logistic regression of the imagenet-linear arm."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    C: float
    Cs_tried: list[float]
    feature_mean: list[float]
    feature_scale: list[float]
    coef: list[float]
    intercept: float
    class_weight: str | None
    depth: str | None = Field(
        default=None, description="the module whose pooled output the probe reads; None: the head's input (ResNet "
                                  "layer4)",
    )


class DepthProbe(StrictModel):
    """The linear probe at one depth: its validation and test AUC (None when a part has a single class)."""

    depth: str = Field(description="module whose pooled output was read, e.g. layer3")
    feature_dim: int = Field(ge=1)
    C: float
    val_auc: float | None
    test_auc: float | None


class ProbeDepths(StrictModel):
    """probe_depths.json: a probe per depth, all from one forward pass; the depth is chosen on validation only.

    Args:
        depths: one DepthProbe per depth, shallow to deep.
        chosen_depth: the depth with the highest validation AUC (ties: the shallower one, the cheaper features);
            predictions.csv, val_predictions.csv and linear_model.json come from it.
        selection: how the depth was chosen, in words.
    """

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    model: str
    depths: list[DepthProbe]
    chosen_depth: str
    selection: str = "highest validation AUC (ties: the shallower depth); the test part is never looked at"


class RunSummary(StrictModel):
    """status.json, and what train_arm returns."""

    schema_version: Literal["1.0"] = TRAINING_SCHEMA_VERSION
    arm: CanonicalArm = Field(description="canonical arm name (data_schemas.arms)")
    status: Literal["running", "completed", "skipped", "failed"]
    reason: str = ""
    run_dir: str
    fold: int = 0
    config_hash: str = ""
    epochs_run: int = 0
    best_epoch: int | None = None
    best_val_auc: float | None = None
    test_auc: float | None = None
    wall_seconds: float | None = None
    updated_at: str


# ------------------------------------------------------------------------------------------------------- splits


class SplitRow(StrictModel):
    """One row of splits.csv (hashed keys only)."""

    schema_version: Literal["1.0"] = SPLITS_SCHEMA_VERSION
    image_key: str
    patient_key: str
    label: str
    part: Literal["train", "val", "test"] = Field(description="the patient's part in the run of outer fold 0")
    fold: int | None = Field(
        default=None, ge=0,
        description="the outer fold in which the patient is tested; None for a patient never tested (hold-out mode)",
    )


class PartCounts(StrictModel):
    images: int
    patients: int
    labels: dict[str, int]


class SplitsInfo(StrictModel):
    """splits.json, beside splits.csv: how the split was made and the overlap check."""

    schema_version: Literal["1.0"] = SPLITS_SCHEMA_VERSION
    dataset_hash: str
    seed: int
    val_fraction: float
    test_fraction: float
    mode: Literal["holdout", "cross-validated"] = "holdout"
    folds: int = Field(ge=1, description="outer folds, each a test part (1 in hold-out mode, K with --folds K)")
    folds_requested: int | None = None
    ordering: str = Field(
        default="",
        description="how patients are ordered before splitting: by a hash of their pixel content, so the split does "
        "not depend on the pseudonymization key",
    )
    splitter: str
    parts: dict[str, PartCounts]
    n_unlabeled_excluded: int
    patient_overlap: int = Field(description="patients in two parts or two folds; checked, must be 0")
    splits_sha256: str
    created_at: str


# ----------------------------------------------------------------------------------------------------- profiles


def load_profiles(path: Path = PROFILES_FILE) -> dict[str, ProfileSpec]:
    """Read profiles.json."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: ProfileSpec.model_validate(spec) for name, spec in raw.items() if not name.startswith("_")}


def parse_override_value(text: str) -> Any:
    """`--set` values: JSON when it parses (numbers, true/false, null, lists), else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _apply_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ValueError(f"setting '{key}': '{part}' is not a group of settings")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


KNOWN_SETTINGS: tuple[str, ...] = tuple(_known_keys(TrainConfig))


def resolve_train_config(profile: str, arm: str, overrides: dict[str, str] | None = None) -> TrainConfig:
    """profile base -> the arm's mode section -> the arm's own section ('resnet18:imagenet', when the profile has
    one) -> overrides (dotted keys, values parsed as JSON when possible).

    Raises ValueError with one sentence for an unknown profile, arm, key, or a value that does not validate.
    """
    profiles = load_profiles()
    if profile not in profiles:
        raise ValueError(f"unknown profile '{profile}'; choose one of {', '.join(profiles)}.")
    arm_spec = parse_arm(arm)  # ValueError listing every model and mode
    spec = profiles[profile]
    values: dict[str, Any] = json.loads(json.dumps(spec.base))
    # the mode's section (so 'resnet18:imagenet' gets the imagenet warm-up and learning rates), then the arm's own
    sections = [arm_spec.mode] + ([arm_spec.name] if arm_spec.name != arm_spec.mode else [])
    for section in sections:
        for key, value in spec.arms.get(section, {}).items():
            _apply_dotted(values, key, value)
    for key, text in (overrides or {}).items():
        if key not in KNOWN_SETTINGS:
            raise ValueError(f"unknown setting '{key}' in --set; known settings: {', '.join(KNOWN_SETTINGS)}.")
        _apply_dotted(values, key, parse_override_value(text))
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where, message = ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ").rstrip(".")
        if not where:  # a rule across settings (e.g. val_fraction + test_fraction)
            raise ValueError(f"invalid settings for profile '{profile}': {message}.") from None
        raise ValueError(f"invalid setting '{where}' for profile '{profile}': {message}.") from None
