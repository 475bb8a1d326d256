"""Schemas of the cost stage: the device catalogue (devices.json) and the estimate file (cost.json).

Conventions used everywhere in the cost stage:
    FLOPs       floating-point operations as counted by torch.utils.flop_counter.FlopCounterMode, i.e. 2 per
                multiply-add. ResNet-50 at 224 x 224 x 3 is ~4.1 G multiply-adds = ~8.2 GFLOPs forward.
    TFLOPS      peak rates in 10^12 FLOP/s, as vendors quote them (also 2 per fused multiply-add).
    bytes       memory in bytes; GB in the catalogue means 10^9 bytes as vendors quote it.

cost.json is written once, by the cost stage, and holds estimates only. What a run really took lives in that run's
timing.json; evaluation sets the two side by side (tasks.cost.estimate.estimated_seconds_for prices the epochs actually
run).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import ConfigDict, Field, field_validator, model_validator

from data_schemas.arms import (
    DEFAULT_MODEL,
    MIN_IMAGE_SIZE,
    CanonicalArm,
    ModelName,
    canonical_arm_name,
    default_arms,
    parse_arms,
)
from data_schemas.base import StrictModel

COST_SCHEMA_VERSION = "1.1"  # 1.1: estimates only (no `actual`), ArmCost.n_images and head_warmup_epochs
COST_FILE = "cost.json"
WALL_TIME_CORRECTION_FILE = "wall_time_correction.json"
DEVICE_CATALOGUE_FILE = "devices.json"
THIS_MACHINE = "this-machine"

ARM_DESCRIPTIONS: dict[str, str] = {spec.name: spec.description for spec in default_arms()}

Precision = Literal["fp32", "tf32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
OptimizerName = Literal["adam", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


# --------------------------------------------------------------------------------------------- device catalogue


class DeviceRate(StrictModel):
    """One precision on one device: the vendor's peak and the fraction of it ResNet-50 training achieves."""


    peak_tflops: float = Field(gt=0, description="vendor peak in 10^12 FLOP/s (dense, no sparsity)")
    utilisation: float = Field(gt=0, le=1, description="assumed achievable fraction of peak for ResNet-50 training")

    @property
    def effective_flops_per_second(self) -> float:
        return self.peak_tflops * 1e12 * self.utilisation


class DeviceSpec(StrictModel):
    """One accelerator (or this computer's CPU) in the catalogue."""


    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="stable key, e.g. 'a100'")
    label: str = Field(min_length=1, description="what a person calls it, for tables")
    kind: Literal["gpu", "cpu"]
    memory_gb: float = Field(gt=0, description="device memory in 10^9 bytes (RAM for a CPU)")
    rates: dict[Precision, DeviceRate] = Field(description="peak and utilisation per supported precision; fp32 "
                                                           "required")
    source: str = Field(min_length=1, description="where the peak figures come from")
    notes: str = ""

    @model_validator(mode="after")
    def _fp32_required(self) -> "DeviceSpec":
        if "fp32" not in self.rates:
            raise ValueError(f"device {self.name!r} has no 'fp32' rate; every device needs one as the fallback")
        return self


class DeviceCatalogue(StrictModel):
    """devices.json: the devices the estimate is priced on."""


    schema_version: Literal["1.0"] = "1.0"
    devices: list[DeviceSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "DeviceCatalogue":
        names = [d.name for d in self.devices]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"device names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def get(self, name: str) -> DeviceSpec:
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(f"no device {name!r} in the catalogue; known: {', '.join(d.name for d in self.devices)}")


# --------------------------------------------------------------------------------------------- calibration


class Calibration(StrictModel):
    """What a short measurement on this computer found (cached in calibration.json by its key)."""


    key: str = Field(description="sha256 of the fields that make a calibration reusable")
    torch_version: str
    cpu_model: str
    threads: int
    image_size: int
    channels: int
    precision: Precision = Field(description="precision actually used: bf16 autocast where the CPU supports it")
    channels_last: bool | None = Field(
        default=None, description="memory format of the timed steps: the one training uses at this precision "
                                  "(channels-last with bf16 autocast); None: measured before it was recorded, always "
                                  "channels-last"
    )
    matmul_flops_per_second: float = Field(gt=0, description="square matrix product rate, used as this machine's peak")
    train_batch_size: int
    train_steps: int
    train_images_per_second: float = Field(gt=0)
    train_flops_per_image: float = Field(gt=0, description="counted FLOPs of one forward + backward per image")
    train_flops_per_second: float = Field(gt=0, description="achieved: images/s x FLOPs per image")
    utilisation: float = Field(gt=0, description="train_flops_per_second / matmul_flops_per_second")
    warmup_seconds: float = Field(
        default=0.0, ge=0, description="extra time of the first training step (kernel selection, allocation): paid "
                                       "once per run"
    )
    seconds_taken: float
    measured_at: str
    load_average: float | None = Field(
        default=None, ge=0, description="1-minute load average when the measurement started (os.getloadavg)"
    )
    cpus: int | None = Field(default=None, description="CPUs of the machine (os.cpu_count), to read the load against")
    step_spread: float | None = Field(
        default=None, ge=0, description="(slowest - fastest) / mean of the timed steps: how steady the machine was"
    )

    @property
    def timed_channels_last(self) -> bool:
        """Whether its steps were timed channels-last (a calibration recorded without the field always was)."""
        return self.channels_last is not False


class CalibrationCache(StrictModel):
    """calibration.json: calibrations by key."""


    schema_version: Literal["1.0"] = "1.0"
    entries: dict[str, Calibration] = Field(default_factory=dict)


class PhaseCounts(StrictModel):
    """Counts for one training phase of one model at one size and channel count (tasks.cost.flops.count_phase).

    Args:
        phase: "full", "head" or "features" (see tasks.cost.flops.phase_model).
        feature_dim: width of the pooled features the model's head reads (tasks.training.models.feature_dim).
        forward_flops_per_image: FLOPs of one forward pass of one image.
        train_flops_per_image: forward + backward for full/head; equal to forward for features.
        params_total: every parameter of the phase's model.
        params_trainable: those with requires_grad.
        buffers: BatchNorm running statistics and counters (kept in memory, not trained).
    """

    model_config = ConfigDict(frozen=True)

    phase: str
    feature_dim: int
    forward_flops_per_image: float
    train_flops_per_image: float
    params_total: int
    params_trainable: int
    buffers: int


class ModelCountsCache(StrictModel):
    """model_counts.json beside calibration.json: counted FLOPs and measured activation bytes by key (the
    arguments, the CPU, torch's and torchvision's versions and a hash of the code that counts), so that an estimate
    needs no model built when nothing they depend on changed."""

    schema_version: Literal["1.0"] = "1.0"
    phase_counts: dict[str, PhaseCounts] = Field(default_factory=dict)
    activation_bytes: dict[str, tuple[int, int]] = Field(default_factory=dict, description="(fixed, per image) bytes")


# --------------------------------------------------------------------------------------------- cost.json


class CostInputs(StrictModel):
    """What the estimate is for. Every field is part of the config hash."""


    n_images: int = Field(ge=1, description="training images per epoch")
    image_size: int = Field(ge=MIN_IMAGE_SIZE, le=2048, description="square input side in pixels")
    channels: int = Field(ge=1, le=3, description="input channels (1 for CT)")
    epochs: int = Field(ge=1, le=100_000)
    batch_size: int = Field(ge=1, le=65_536)
    precision: Precision = "bf16"
    arms: list[str] = Field(
        default_factory=lambda: [spec.name for spec in default_arms()],
        min_length=1,
        description="canonical arm names (data_schemas.arms.parse_arm): 'scratch', 'resnet18:imagenet', ...",
    )
    num_classes: int = Field(default=2, ge=2)
    optimizer: OptimizerName = "adam"
    head_warmup_epochs: int = Field(default=0, ge=0, description="imagenet arm: head-only epochs, within `epochs`")
    linear_fit_iterations: int = Field(default=100, ge=1, description="imagenet-linear arm: logistic-regression "
                                                                      "iterations")
    device_memory_gb: float | None = Field(default=None, gt=0, description="also report the largest batch for this "
                                                                           "memory")
    dataset_content_hash: str | None = Field(default=None, description="dataset.json content_hash when read from a "
                                                                       "dataset")

    @field_validator("arms", mode="before")
    @classmethod
    def _canonical_arms(cls, value: object) -> object:
        if isinstance(value, (list, tuple)):
            return [spec.name for spec in parse_arms(value)]  # ValueError: bad name or an arm listed twice
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CostInputs":
        if self.head_warmup_epochs > self.epochs:
            raise ValueError(f"head_warmup_epochs ({self.head_warmup_epochs}) cannot exceed epochs ({self.epochs})")
        return self


class MemoryEstimate(StrictModel):
    """Training memory on the device, in bytes."""


    weights_bytes: int = Field(ge=0, description="all parameters and buffers in fp32")
    gradients_bytes: int = Field(ge=0, description="fp32 gradient per trainable parameter")
    optimizer_bytes: int = Field(ge=0, description="Adam: 2 x trainable fp32 (m, v); SGD momentum: 1 x")
    activations_bytes_per_image: int = Field(ge=0, description="measured tensors kept for backward, per image")
    activations_fixed_bytes: int = Field(ge=0, description="measured batch-independent saved tensors (autocast weight "
                                                           "copies)")
    activations_bytes: int = Field(ge=0, description="for the configured batch size")
    total_bytes: int = Field(ge=0)
    method: str = Field(description="how activations were measured")


class DeviceEstimate(StrictModel):
    """One arm priced on one device."""


    device: str
    precision: Precision = Field(description="precision used on this device (falls back to fp32 when unsupported)")
    peak_flops_per_second: float
    utilisation: float
    effective_flops_per_second: float
    seconds_per_epoch: float
    overhead_seconds: float = Field(default=0.0, ge=0, description="fixed start-up time (this machine: calibrated "
                                                                   "warm-up)")
    seconds: float = Field(description="estimated wall time for the planned run: flops_total / effective rate + "
                                       "overhead")
    max_batch_size: int = Field(ge=0, description="largest batch whose training memory fits (90% of device memory)")
    batch_fits: bool


class ArmCost(StrictModel):
    """The estimate for one arm on every device of the catalogue."""

    arm: CanonicalArm = Field(description="canonical arm name (data_schemas.arms.parse_arm)")
    model: ModelName = Field(default=DEFAULT_MODEL, description="torchvision model of the arm")
    description: str
    params_total: int
    params_trainable: int
    forward_flops_per_image: float
    train_flops_per_image: float = Field(description="FLOPs per image per epoch of the main training phase")
    head_phase_flops_per_image: float | None = Field(default=None, description="imagenet arm: per image in a head-only "
                                                                               "epoch")
    classifier_fit_flops: float = Field(default=0.0, description="imagenet-linear arm: logistic-regression fit")
    n_images: int = Field(ge=1, description="training images priced per epoch")
    head_warmup_epochs: int = Field(default=0, ge=0, description="imagenet arm: head-only epochs at the start, within "
                                                                 "epochs")
    flops_per_epoch: float = Field(description="n_images x train_flops_per_image; linear arm: the single feature pass")
    flops_total: float
    epochs_effective: int = Field(description="passes over the data: epochs, or 1 for the linear arm")
    memory: MemoryEstimate
    max_batch_for_given_memory: int | None = Field(default=None, description="for inputs.device_memory_gb, when given")
    devices: list[DeviceEstimate]
    formulas: list[str] = Field(default_factory=list)


class PlannedRunWork(StrictModel):
    """One planned training run, as the wall-time prediction prices it.

    Args:
        arm: canonical arm name (priced from that arm's ArmCost).
        max_epochs: the run's epochs setting.
        min_epochs: the earliest epoch at which early stopping can end it (= max_epochs without early stopping).
        n_images: training images of the run (the split's training images x its share of the training patients).
        image_size: its training input side in pixels.
        trained: False when the run will be skipped (a pretrained arm without weights): priced as a skip.
    """

    arm: str
    max_epochs: int = Field(ge=1)
    min_epochs: int = Field(ge=1)
    n_images: int = Field(ge=1)
    image_size: int = Field(ge=16)
    trained: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> "PlannedRunWork":
        if self.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) cannot exceed max_epochs ({self.max_epochs})")
        return self


class WallTimePlan(StrictModel):
    """What a whole comparison will do, for its wall-time prediction.

    Args:
        runs: every planned training run.
        elapsed_seconds: measured seconds already spent by the command before its cost stage (start-up, the
            demo's cohort, ingest, split); 0 when the prediction covers only what follows.
    """

    runs: list[PlannedRunWork]
    elapsed_seconds: float = Field(default=0.0, ge=0)


class StageTime(StrictModel):
    """One stage of the wall-time prediction: its seconds at the earliest early stop and at the last epoch."""

    stage: str
    seconds_min: float = Field(ge=0)
    seconds_max: float = Field(ge=0)
    basis: str = Field(description="how the seconds are obtained (rate x work, with its source)")


class WallTimeEstimate(StrictModel):
    """The predicted wall time of a whole comparison, made by the cost stage before training starts."""

    seconds_min: float = Field(ge=0, description="every early-stopping run stops at its earliest epoch")
    seconds_max: float = Field(ge=0, description="every run trains all its epochs")
    stages: list[StageTime]
    formula: str
    notes: list[str] = Field(default_factory=list)


class WallTimeCorrection(StrictModel):
    """wall_time_correction.json beside cost.json: the comparison's predicted wall time corrected by a training run's
    first epoch, when that epoch disagreed with the calibration (tasks.cost.first_epoch). cost.json keeps the
    prediction made before training; this file is what the progress shown in the UI counts down to."""

    arm: str
    run_dir: str
    ratio: float = Field(gt=0, description="the first epoch's measured training time / its prediction")
    seconds_min: float = Field(ge=0, description="the corrected wall time of the comparison, earliest stops")
    seconds_max: float = Field(ge=0, description="the corrected wall time of the comparison, every epoch")
    measured_at: float = Field(description="when the epoch was judged, seconds since the epoch (time.time())")


class CostReport(StrictModel):
    """cost.json."""


    schema_version: Literal["1.1"] = COST_SCHEMA_VERSION
    created_at: str
    ctcompare_version: str
    config_hash: str = Field(description="sha256 of inputs, catalogue and calibration choice: equal hash, same "
                                         "estimate")
    flop_convention: str
    inputs: CostInputs
    calibrated: bool
    calibration: Calibration | None = None
    catalogue_sha256: str
    devices: list[DeviceSpec] = Field(description="the catalogue as priced (this-machine after calibration)")
    arms: list[ArmCost]
    notes: list[str] = Field(default_factory=list)
    wall_time: WallTimeEstimate | None = Field(
        default=None, description="the whole comparison's predicted wall time (compare and demo only)"
    )

    def arm(self, name: str) -> ArmCost:
        """The estimate of arm `name` in any accepted spelling ('resnet50:scratch' finds 'scratch'); KeyError if
        absent."""
        try:
            name = canonical_arm_name(name)
        except ValueError:
            pass  # not an arm name at all: reported as absent below, as callers expect a KeyError
        for arm in self.arms:
            if arm.arm == name:
                return arm
        raise KeyError(f"cost.json has no arm {name!r}; it has {', '.join(a.arm for a in self.arms)}")
