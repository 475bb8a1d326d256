"""A comparison's training runs checked, after their first epoch, against the calibration the prediction used.

The cost stage predicts each run's epochs from this machine's calibration (tasks.cost.wall_time). After a run's
first epoch, the training part of that epoch (its validation left out, which the calibration does not measure) is
compared with what the calibration predicts for it. When they disagree by more than FIRST_EPOCH_TOLERANCE (the short
probe's rule, tasks.cost.calibration), the run's remaining epochs and the comparison's prediction are scaled by the
measured ratio and logged, and the cached calibration is dropped, so the next cost stage measures this machine again.
Not judged: a training part predicted shorter than MIN_JUDGED_EPOCH_S (mostly the first steps' kernel selection), a
head-only epoch (a frozen backbone's steps are not the calibration's), a run on another device, precision, memory
format or thread count than the calibration's, and a run sharing the machine with other training runs of its plan
(parallel arms).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_schemas.cost import (
    COST_FILE,
    THIS_MACHINE,
    WALL_TIME_CORRECTION_FILE,
    CostReport,
    PlannedRunWork,
    WallTimeCorrection,
)
from data_schemas.files import read_model_json, read_models_csv, write_model_json
from data_schemas.plan import RunPlan, read_plan
from data_schemas.training import CONFIG_FILE, METRICS_FILE, STATUS_FILE, EpochMetrics, RunConfig, RunSummary
from tasks.cost.calibration import PROBE_TOLERANCE, describe_calibration, forget_calibration
from tasks.cost.wall_time import earliest_stop_epoch, run_training_seconds

FIRST_EPOCH_TOLERANCE = PROBE_TOLERANCE
MIN_JUDGED_EPOCH_S = 5.0


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _span(low: float, high: float) -> str:
    return _minutes(low) if _minutes(low) == _minutes(high) else f"{_minutes(low)} to {_minutes(high)}"


@dataclass(frozen=True)
class FirstEpochCheck:
    """One run's first epoch against its prediction, and the predictions it corrects.

    Args:
        arm: the run's arm.
        measured_s: the training part of the first epoch (its validation left out), seconds.
        predicted_s: its prediction from the calibration, (compute at the calibrated rate, the same + the
            calibration's warm-up): a run pays between none of the first steps' warm-up (kernels this process has
            already built) and all of it.
        rest_s: the run's remaining epochs as predicted, (earliest stop, last epoch).
        total_s: the comparison's predicted wall time, (earliest stop, every epoch).
        training_s: the part of total_s that is training, (earliest stop, every epoch).
        calibration: which calibration the prediction used, in words.
    """

    arm: str
    measured_s: float
    predicted_s: tuple[float, float]
    rest_s: tuple[float, float]
    total_s: tuple[float, float]
    training_s: tuple[float, float]
    calibration: str

    @property
    def ratio(self) -> float:
        """measured / the nearer end of the predicted range (1 inside it)."""
        low, high = self.predicted_s
        return self.measured_s / min(max(self.measured_s, low), high)

    @property
    def disagrees(self) -> bool:
        """True when the first epoch is further than FIRST_EPOCH_TOLERANCE from its prediction."""
        return abs(self.ratio - 1.0) > FIRST_EPOCH_TOLERANCE

    def corrected_total_s(self) -> tuple[float, float]:
        """The comparison's prediction with its training scaled by the measured ratio."""
        return tuple(total + (self.ratio - 1.0) * train for total, train in zip(self.total_s, self.training_s))

    def rest_left_s(self) -> float:
        """This run's remaining epochs, all of them, at the measured pace when it disagrees (else as predicted)."""
        return self.rest_s[1] * (self.ratio if self.disagrees else 1.0)

    def sentence(self, calibration_dropped: bool) -> str:
        """What the log says: agreement, or the corrected estimates and what happens to the calibration."""
        low, high = self.predicted_s
        said = (f"{self.arm}: the first epoch's training took {self.measured_s:.1f} s, predicted {low:.1f} s to "
                f"{high:.1f} s (without and with the first steps' warm-up) from {self.calibration}")
        if not self.disagrees:
            return f"{said}: within {abs(self.ratio - 1.0):.0%}, the prediction stands."
        total_low, total_high = self.corrected_total_s()
        dropped = ("the cached calibration is dropped, so the next cost stage measures this machine again"
                   if calibration_dropped else "the cached calibration was already replaced")
        return (f"{said}: {self.ratio:.2f}x, more than {FIRST_EPOCH_TOLERANCE:.0%} off. Corrected from this epoch: "
                f"this run's remaining epochs about {_span(*(s * self.ratio for s in self.rest_s))} (predicted "
                f"{_span(*self.rest_s)}), the comparison about {_span(total_low, total_high)} in all (predicted "
                f"{_span(*self.total_s)}); {dropped}.")


def check_first_epoch(report: CostReport, config: RunConfig, first: EpochMetrics) -> FirstEpochCheck | None:
    """The training part of a run's first epoch (config.json's run; its metrics.csv row `first`) against what the
    calibration predicts for it; None when not judged (module doc): no calibration or prediction, an arm the report
    did not price, a head-only epoch, another device, precision, memory format or thread count, or a part predicted
    under MIN_JUDGED_EPOCH_S.

        images      = steps x batch (train_one_epoch: n_train // batch full batches)
        measured    = images / the epoch's training images per second
        predicted   = images x train FLOPs per image x (s_run / s_priced)^2 / (peak x utilisation)
                      (+ the calibration's warm-up at the range's top)
    """
    calibration, wall_time = report.calibration, report.wall_time
    if calibration is None or wall_time is None or config.device != "cpu" or first.phase != "full":
        return None
    measured_like = (calibration.precision, calibration.threads, calibration.timed_channels_last)
    if (config.precision, config.num_threads, config.channels_last) != measured_like:
        return None
    if not first.images_per_second:
        return None
    train = config.train
    try:
        arm = report.arm(config.arm)
        machine = next(d for d in arm.devices if d.device == THIS_MACHINE)
    except (KeyError, StopIteration):
        return None
    batch = min(train.batch_size, config.n_train_images)
    images = max(1, config.n_train_images // batch) * batch
    per_image = arm.train_flops_per_image * (train.image_size / report.inputs.image_size) ** 2
    compute = images * per_image / machine.effective_flops_per_second
    if compute < MIN_JUDGED_EPOCH_S:
        return None
    work = PlannedRunWork(
        arm=config.arm, max_epochs=train.epochs, n_images=config.n_train_images, image_size=train.image_size,
        min_epochs=earliest_stop_epoch(epochs=train.epochs, min_epochs=train.min_epochs,
                                       patience=train.early_stopping_patience),
    )
    first_epoch = run_training_seconds(report, work, 1)
    training = [s for s in wall_time.stages if s.stage.startswith("training ")]
    return FirstEpochCheck(
        arm=config.arm, measured_s=images / first.images_per_second,
        predicted_s=(compute, compute + machine.overhead_seconds),
        rest_s=tuple(run_training_seconds(report, work, epochs) - first_epoch
                     for epochs in (work.min_epochs, work.max_epochs)),
        total_s=(wall_time.seconds_min, wall_time.seconds_max),
        training_s=(sum(s.seconds_min for s in training), sum(s.seconds_max for s in training)),
        calibration=describe_calibration(calibration),
    )


def _others_training(plan: RunPlan, report_dir: Path, run: str) -> bool:
    """True when another run of the plan says it is training now (status.json "running")."""
    for planned in plan.runs:
        status = report_dir / planned.run_dir / STATUS_FILE
        if planned.run_dir != run and status.is_file():
            try:
                if read_model_json(status, RunSummary).status == "running":
                    return True
            except ValueError:
                continue
    return False


def first_epoch_watch(plan_path: Path, run: str, log: logging.Logger | logging.LoggerAdapter,
                      ) -> Callable[[int], FirstEpochCheck | None] | None:
    """For a training run's on_epoch_end: after epoch 1, the check above against the cost.json beside the plan (a
    comparison's), said in `log` and returned. When they disagree, the cached calibration is dropped and the
    corrected prediction written to wall_time_correction.json beside cost.json (the comparison's progress counts
    down to it). None without a cost.json holding a prediction and a calibration."""
    report_dir = Path(plan_path).resolve().parent
    try:
        report = read_model_json(report_dir / COST_FILE, CostReport)
        plan = read_plan(Path(plan_path))
        run_dir = Path(os.path.normpath(report_dir / plan.run(run).run_dir))
    except (OSError, ValueError):
        return None
    if report.calibration is None or report.wall_time is None:
        return None

    def after_epoch(epoch: int) -> FirstEpochCheck | None:
        if epoch != 1:  # only a run's own first epoch (a resumed run starts later)
            return None
        try:
            config = read_model_json(run_dir / CONFIG_FILE, RunConfig)
            first = read_models_csv(run_dir / METRICS_FILE, EpochMetrics)[0]
        except (OSError, ValueError, IndexError):
            return None
        check = check_first_epoch(report, config, first)
        if check is None or _others_training(plan, report_dir, run):
            return None
        if not check.disagrees:
            log.info("%s", check.sentence(calibration_dropped=False))
            return check
        log.warning("%s", check.sentence(calibration_dropped=forget_calibration(report.calibration)))
        low, high = check.corrected_total_s()
        try:
            write_model_json(report_dir / WALL_TIME_CORRECTION_FILE, WallTimeCorrection(
                arm=check.arm, run_dir=run, ratio=check.ratio, seconds_min=low, seconds_max=high,
                measured_at=time.time()))
        except OSError as error:  # the log already says it; a progress bar is never worth a failed run
            log.debug("%s not written: %s", WALL_TIME_CORRECTION_FILE, error)
        return check

    return after_epoch


def corrected_wall_time(report_dir: Path, since: float) -> WallTimeCorrection | None:
    """The comparison's wall time as corrected by a first epoch judged at or after `since` (this comparison's
    start), or None: no correction yet, or one left by an earlier comparison in the folder."""
    try:
        correction = read_model_json(Path(report_dir) / WALL_TIME_CORRECTION_FILE, WallTimeCorrection)
    except (OSError, ValueError):
        return None
    return correction if correction.measured_at >= since else None
