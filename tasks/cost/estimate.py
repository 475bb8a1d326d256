"""Compute-cost estimate of each training arm: FLOPs (tasks.cost.flops), memory (tasks.cost.memory) and time per
device (tasks.cost.catalogue, calibrated by tasks.cost.calibration), as cost.json.

The classic back-of-envelope ("ResNet-50 on ImageNet took ~14 days on one M40, ~10^18 operations; a dataset
10,000x smaller costs 10,000x less per epoch; grayscale makes conv1 3x cheaper; cost scales with pixel count") is
done here from the actual model and dataset. The "10^18 single-precision operations" for 90 ImageNet epochs in You
et al. 2018 ("ImageNet Training in Minutes") are multiply-adds: 1.28e6 images x 90 epochs x 3 (fwd+bwd) x 4.1e9 MAC
~ 1.4e18 MAC ~ 2.8e18 FLOPs; at the M40's 7 TFLOP/s FP32 peak and the catalogue's 35% utilisation that is
2.8e18 / (7e12 x 0.35) ~ 1.15e6 s ~ 13 days, the quoted "14 days" (tests/test_cost.py checks it).

cost.json holds estimates only: each training run writes what it really took to its own timing.json, and the
evaluation stage asks estimated_seconds_for for the estimate of the epochs actually run. Plain typed functions
first, thin Prefect @task wrappers at the end; the tables that present a CostReport live in reports/cost_tables.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from data_schemas.arms import DEFAULT_MODEL, ArmSpec, default_arms, parse_arm, parse_arms
from data_schemas.cost import (
    COST_FILE,
    COST_SCHEMA_VERSION,
    THIS_MACHINE,
    ArmCost,
    Calibration,
    CostInputs,
    CostReport,
    DeviceCatalogue,
    DeviceEstimate,
    DeviceSpec,
    MemoryEstimate,
    Precision,
)
from data_schemas.files import read_model_json, sha256_file, sha256_json, write_model_json
from tasks.common.environment import ctcompare_version, utc_now
from tasks.cost.calibration import checked_calibration
from tasks.cost.catalogue import default_catalogue_path, load_catalogue, price_this_machine, resolve_precision
from tasks.cost.flops import (
    FLOP_CONVENTION,
    arm_flops_for_epochs,
    classifier_params,
    count_phase,
    linear_fit_flops,
    training_flops,
)
from tasks.cost.memory import max_batch_size, measure_activation_memory, memory_estimate


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
            f"classifier_fit_flops = iterations ({inputs.linear_fit_iterations}) x 4 x n x {dim} x classes(1 if "
            "binary)",
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
            return (
                arm_flops_for_epochs(arm, epochs_run) / estimate.effective_flops_per_second + estimate.overhead_seconds
            )
    raise KeyError(f"arm {arm.arm!r} has no estimate for device {device!r}")


def config_hash(inputs: CostInputs, catalogue_sha256: str, calibrate: bool) -> str:
    """Identity of an estimate: inputs, catalogue content, calibration choice and schema version."""
    return sha256_json(
        {"inputs": inputs.model_dump(mode="json"), "catalogue": catalogue_sha256, "calibrate": calibrate,
         "v": COST_SCHEMA_VERSION}
    )


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
    if any(parse_arm(arm).model != DEFAULT_MODEL for arm in inputs.arms):
        notes.append(
            "Utilisation (this machine's calibration and the catalogue's figures) is ResNet-50's: other models are "
            "priced at the same share of peak, which likely overstates the speed of depthwise-convolution networks "
            "(MobileNetV3), whose low arithmetic intensity reaches a smaller share of peak."
        )
    return CostReport(
        created_at=utc_now(),
        ctcompare_version=ctcompare_version(),
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
        raise ValueError(f"{dataset} is not a ctcompare dataset folder: {DATASET_CARD_FILE} is missing (run 'ctcompare "
                         "ingest').")
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
    # ValueError: one sentence
    fields["arms"] = [spec.name for spec in parse_arms(fields.get("arms") or default_arms())]
    try:
        return CostInputs(**fields)
    except ValidationError as error:
        raise ValueError(_validation_sentence(error)) from None


# ============================================================================================ Prefect tasks


@task(name="cost-calibrate", task_run_name="calibrate-{image_size}px", cache_policy=NO_CACHE)
def calibrate_task(image_size: int, channels: int, precision: Precision, batch_size: int) -> Calibration:
    """This machine's calibration, a cached one checked by a short probe first (checked_calibration); logs which."""
    calibration, sentence = checked_calibration(image_size, channels, precision, batch_size)
    get_run_logger().info("%s", sentence)
    return calibration


@task(name="cost-estimate", cache_policy=NO_CACHE)
def estimate_task(inputs: CostInputs, calibration: Calibration | None) -> CostReport:
    """Count, measure and price every arm (build_cost_report)."""
    return build_cost_report(inputs, calibration=calibration)


@task(name="cost-write", cache_policy=NO_CACHE)
def write_task(out_dir: Path, report: CostReport) -> Path:
    """Write cost.json atomically."""
    return write_cost_report(out_dir, report)
