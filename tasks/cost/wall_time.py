"""A comparison's wall time, predicted before training starts, from this machine's calibrated cost estimate.

Start-up, the demo's cohort, ingest and the split are not predicted: they are over when the cost stage runs, so
their measured time is added (WallTimePlan.elapsed_seconds). The constants below price what the calibrated FLOP
estimate leaves out; docs/wall-time.md says how they were measured.
"""

from __future__ import annotations

from pathlib import Path

from data_schemas.arms import parse_arm
from data_schemas.cost import THIS_MACHINE, CostReport, PlannedRunWork, StageTime, WallTimeEstimate, WallTimePlan
from data_schemas.plan import RunEnvironment, RunPlan
from tasks.cost.flops import arm_flops_for_epochs

# What the calibrated FLOP estimate leaves out, from this machine's demo runs (docs/wall-time.md: how measured).
TRAIN_WALL_FACTOR = 1.23  # epochs' wall time / compute estimate: data, augmentation, per-epoch evaluation, checkpoints
RUN_SETUP_S = 3.2  # per trained run, outside its epochs: data and model set-up, test predictions
LINEAR_RUN_SETUP_S = 12.5  # an imagenet-linear run beyond its compute: weights, feature extraction, fit, predictions
RUN_SKIPPED_S = 0.45  # a pretrained run skipped for want of weights
EVALUATION_S_PER_ARM = 0.5  # evaluate-arms, per completed arm
PACKAGE_S_PER_ARM = 4.1  # model package + deployment-cost timing, per completed arm
COMPRESSION_S = 18.0  # int8 variant of the recommended arm, written, timed and compared, once
VISUAL_S = 3.2  # saliency pictures and the shortcut check, once ...
VISUAL_S_PER_ARM = 0.9  # ... plus this per arm
REPORT_S = 5.8  # report rendering and artifacts, the end of the flow run and of the process

WALL_TIME_FORMULA = (
    "T = T_elapsed (measured: start-up, cohort, ingest, split) + T_cost (measured) "
    "+ sum over trained runs [(FLOPs(arm, e) / (peak x utilisation) x (n_run / n_priced) x (s_run / s_priced)^2) "
    "x f_wall + overhead + T_run] + n_skipped x T_skip "
    "+ n_arms x (T_eval + T_package + T_visual_arm) + T_visual + T_int8 + T_report, "
    "e = the earliest early stop (min) or the last epoch (max), f_wall = epochs' wall time / compute estimate"
)


def earliest_stop_epoch(*, epochs: int, min_epochs: int, patience: int | None) -> int:
    """The first epoch at which early stopping can end a run (tasks.training.loop: it stops once `patience` epochs in a
    row did not improve and epoch >= min(min_epochs, epochs)): best at epoch 1, so max(min(min_epochs, epochs),
    1 + patience), capped at epochs; epochs when early stopping is off."""
    if patience is None:
        return epochs
    return min(epochs, max(min(min_epochs, epochs), 1 + patience))


def run_training_seconds(report: CostReport, run: PlannedRunWork, epochs: int) -> float:
    """This machine's wall-time estimate for `run` trained `epochs` epochs:

        arm_flops_for_epochs(arm, epochs) / (peak x utilisation) x (n_run / n_priced) x (s_run / s_priced)^2
        x TRAIN_WALL_FACTOR + overhead

    i.e. estimated_seconds_for (nanoGPT's estimate_mfu inverted) with the compute scaled to the run's images and
    input side (FLOPs grow with the number of images and, for a convolutional network, with the pixel count), times
    the measured ratio of the epochs' wall time to that compute (what the calibration's bare steps leave out).
    """
    arm = report.arm(run.arm)
    estimate = next(d for d in arm.devices if d.device == THIS_MACHINE)
    scale = (run.n_images / arm.n_images) * (run.image_size / report.inputs.image_size) ** 2
    compute = arm_flops_for_epochs(arm, epochs) / estimate.effective_flops_per_second * scale
    return compute * TRAIN_WALL_FACTOR + estimate.overhead_seconds


def _stage(stage: str, low: float, high: float | None = None, basis: str = "") -> StageTime:
    return StageTime(stage=stage, seconds_min=low, seconds_max=low if high is None else high, basis=basis)


def _training_stages(report: CostReport, runs: list[PlannedRunWork]) -> list[StageTime]:
    """One stage per arm: its trained runs between their earliest stop and their last epoch, plus skipped runs."""
    stages = []
    for arm in dict.fromkeys(run.arm for run in runs):
        trained = [r for r in runs if r.arm == arm and r.trained]
        skipped = sum(1 for r in runs if r.arm == arm and not r.trained)
        linear = parse_arm(arm).mode == "imagenet-linear"
        setup = LINEAR_RUN_SETUP_S if linear else RUN_SETUP_S
        low = sum(run_training_seconds(report, r, r.min_epochs) + setup for r in trained) + skipped * RUN_SKIPPED_S
        high = sum(run_training_seconds(report, r, r.max_epochs) + setup for r in trained) + skipped * RUN_SKIPPED_S
        epochs = sorted({(r.min_epochs, r.max_epochs) for r in trained})
        work = ("one feature pass and a linear fit" if linear
                else f"epochs {', '.join(f'{a}..{b}' if a != b else f'{b}' for a, b in epochs)}")
        basis = (f"{len(trained)} run(s), {work}: cost estimate x {TRAIN_WALL_FACTOR:g} + {setup:g} s each"
                 if trained else "")
        if skipped:
            basis += ("; " if basis else "") + (f"{skipped} run(s) skipped (no pretrained weights), {RUN_SKIPPED_S:g} "
                                                "s each")
        stages.append(_stage(f"training {arm}", low, high, basis))
    return stages


def predict_wall_time(report: CostReport, plan: WallTimePlan, *, cost_stage_seconds: float) -> WallTimeEstimate:
    """The whole comparison's wall time, before training starts (WALL_TIME_FORMULA; constants above, from this
    machine's demo logs; training from this machine's calibrated cost estimate, run_training_seconds).

    cost_stage_seconds: the cost stage's own time so far (measured by the caller). The range spans early stopping:
    min = every run stops at its earliest epoch, max = every run trains all its epochs.
    """
    arms = [
        arm for arm in dict.fromkeys(run.arm for run in plan.runs) if any(r.trained for r in plan.runs if r.arm == arm)
    ]
    stages = [
        _stage("before the cost stage (start-up, cohort, ingest, split)", plan.elapsed_seconds, basis="measured"),
        _stage("cost stage", cost_stage_seconds, basis="measured"),
    ]
    stages += _training_stages(report, plan.runs)
    n = len(arms)
    visual = VISUAL_S + n * VISUAL_S_PER_ARM if n else 0.0
    stages += [
        _stage("evaluation", n * EVALUATION_S_PER_ARM, basis=f"{n} arm(s) x {EVALUATION_S_PER_ARM:g} s"),
        _stage("packages + deployment cost", n * PACKAGE_S_PER_ARM, basis=f"{n} arm(s) x {PACKAGE_S_PER_ARM:g} s"),
        _stage("int8 variant", COMPRESSION_S if n else 0.0, basis="constant, once"),
        _stage("saliency pictures", visual, basis=f"{VISUAL_S:g} s + {n} arm(s) x {VISUAL_S_PER_ARM:g} s"),
        _stage("report", REPORT_S, basis="constant"),
    ]
    notes = []
    if not report.calibrated:
        notes.append("this machine is not calibrated: the training time uses catalogue defaults (expect a large "
                     "error).")
    if any(not r.trained for r in plan.runs):
        notes.append("pretrained arms are priced as skipped: no weights file was given and none is in torchvision's "
                     "cache "
                     "(a download, where the network allows one, is not priced).")
    return WallTimeEstimate(
        seconds_min=sum(s.seconds_min for s in stages), seconds_max=sum(s.seconds_max for s in stages),
        stages=stages, formula=WALL_TIME_FORMULA, notes=notes,
    )


def pretrained_weights_available(model: str, weights_path: Path | str | None) -> bool:
    """True when a pretrained run of `model` will find weights: a weights file given, or one in torchvision's cache
    (the places tasks.training.weights.resolve_imagenet_weights looks before downloading)."""
    if weights_path:
        return True
    from tasks.training.model_defs import model_def
    from tasks.training.weights import hub_checkpoint_dir, weights_file_name

    return any((hub_checkpoint_dir() / weights_file_name(weights)).is_file() for weights in model_def(model).weights)


def wall_time_plan(plan: RunPlan, environment: RunEnvironment, *, n_train_images: int,
                   elapsed_seconds: float = 0.0) -> WallTimePlan:
    """What a comparison's plan will train, for predict_wall_time: each run's epochs (earliest stop..last),
    images (n_train_images x its share of the training patients), size, and whether it will find weights (the
    environment's weights file, else torchvision's cache)."""
    runs = []
    for planned in plan.runs:
        spec, config = parse_arm(planned.arm), planned.config
        runs.append(
            PlannedRunWork(
                arm=planned.arm,
                max_epochs=config.epochs,
                min_epochs=earliest_stop_epoch(
                    epochs=config.epochs, min_epochs=config.min_epochs, patience=config.early_stopping_patience
                ),
                n_images=max(1, round(n_train_images * planned.train_fraction)),
                image_size=config.image_size,
                trained=spec.mode == "scratch" or pretrained_weights_available(spec.model, environment.weights),
            )
        )
    return WallTimePlan(runs=runs, elapsed_seconds=elapsed_seconds)
