"""The cost stage's prediction of a whole comparison's wall time, checked against arithmetic done by hand.

Training FLOPs come from tests/resnet50_by_hand.py (an independent count), this machine's rate from a fixed
calibration, the fixed stages from the constants in tasks/cost/wall_time.py written out here as numbers; what the
command
spent before its cost stage is measured and added as it is.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import resnet50_by_hand as hand

from data_schemas.cost import (
    COST_FILE,
    WALL_TIME_CORRECTION_FILE,
    Calibration,
    CalibrationCache,
    CostReport,
    PlannedRunWork,
    WallTimePlan,
)
from data_schemas.plan import RunEnvironment, build_run_plan
from reports.cost_tables import markdown_table, wall_time_line
from tasks.cost import (
    calibration as cost_calibration,
    catalogue as cost_catalogue,
    estimate as cost_estimate,
    wall_time as cost_wall_time,
)

RATE = 40e9  # the fixed calibration's achieved training FLOP/s
WARMUP = 5.0  # its first-step warm-up, seconds (once per run)
SIZE = 64


def _calibration() -> Calibration:
    """A calibration whose effective rate on this machine is exactly RATE."""
    key, fields = cost_calibration._calibration_key(SIZE, 1, cost_catalogue.this_machine_precision("bf16"))
    per_image = hand.full_training_flops(SIZE, 1, 2)
    return Calibration(
        key=key, **fields, matmul_flops_per_second=100e9, train_batch_size=16, train_steps=3,
        train_images_per_second=RATE / per_image, train_flops_per_image=per_image, train_flops_per_second=RATE,
        utilisation=RATE / 100e9, warmup_seconds=WARMUP, seconds_taken=1.0, measured_at="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture(scope="module")
def report() -> CostReport:
    """Scratch and imagenet priced for 100 images, 10 epochs at 64 px, 2 of them head-only for imagenet."""
    inputs = cost_estimate.resolve_cost_inputs(
        n_images=100, image_size=SIZE, epochs=10, head_warmup_epochs=2, arms=["scratch", "imagenet"]
    )
    return cost_estimate.build_cost_report(inputs, calibration=_calibration())


def test_earliest_stop_is_patience_after_epoch_one_but_never_before_min_epochs() -> None:
    assert cost_wall_time.earliest_stop_epoch(epochs=10, min_epochs=6, patience=3) == 6
    assert cost_wall_time.earliest_stop_epoch(epochs=10, min_epochs=2, patience=3) == 4
    assert cost_wall_time.earliest_stop_epoch(epochs=3, min_epochs=6, patience=3) == 3
    assert cost_wall_time.earliest_stop_epoch(epochs=10, min_epochs=6, patience=None) == 10


def test_one_run_is_its_epochs_flops_over_the_rate_scaled_to_its_images_and_size(report: CostReport) -> None:
    full = hand.full_training_flops(SIZE, 1, 2)
    half_size = PlannedRunWork(arm="scratch", max_epochs=10, min_epochs=6, n_images=50, image_size=SIZE // 2)
    # 6 epochs x 100 images x full FLOPs, then x 50/100 images x (32/64)^2 pixels, x 1.23 for the epochs' wall time
    assert cost_wall_time.run_training_seconds(report, half_size, 6) == pytest.approx(
        6 * 100 * full / RATE * 0.5 * 0.25 * 1.23 + WARMUP, rel=1e-12
    )
    head = hand.head_only_training_flops(SIZE, 1, 2)
    imagenet = PlannedRunWork(arm="imagenet", max_epochs=10, min_epochs=6, n_images=100, image_size=SIZE)
    assert cost_wall_time.run_training_seconds(report, imagenet, 10) == pytest.approx(
        (2 * 100 * head + 8 * 100 * full) / RATE * 1.23 + WARMUP, rel=1e-12
    )


def test_whole_comparison_is_every_stage_added_by_hand(report: CostReport) -> None:
    full, head = hand.full_training_flops(SIZE, 1, 2), hand.head_only_training_flops(SIZE, 1, 2)
    plan = WallTimePlan(
        runs=[
            PlannedRunWork(arm="scratch", max_epochs=10, min_epochs=6, n_images=100, image_size=SIZE),
            PlannedRunWork(arm="scratch", max_epochs=10, min_epochs=6, n_images=25, image_size=SIZE),
            PlannedRunWork(arm="imagenet", max_epochs=10, min_epochs=6, n_images=100, image_size=SIZE),
        ],
        elapsed_seconds=47.5,
    )
    predicted = cost_wall_time.predict_wall_time(report, plan, cost_stage_seconds=2.5)
    # measured: 47.5 before the cost stage + 2.5 in it
    fixed_before = 47.5 + 2.5
    # 2 arms: evaluation 2 x 0.5, packages 2 x 4.1, int8 18.0 once, saliency 3.2 + 2 x 0.9, report 5.8
    fixed_after = 2 * 0.5 + 2 * 4.1 + 18.0 + 3.2 + 2 * 0.9 + 5.8
    runs_setup = 3 * 3.2 + 3 * WARMUP
    # compute x 1.23, the epochs' measured wall time per second of calibrated compute
    scratch_min = 1.23 * (6 * 100 * full / RATE + 6 * 25 * full / RATE)
    scratch_max = 1.23 * (10 * 100 * full / RATE + 10 * 25 * full / RATE)
    imagenet_min = 1.23 * (2 * 100 * head + 4 * 100 * full) / RATE
    imagenet_max = 1.23 * (2 * 100 * head + 8 * 100 * full) / RATE
    assert predicted.seconds_min == pytest.approx(
        fixed_before + fixed_after + runs_setup + scratch_min + imagenet_min, rel=1e-9
    )
    assert predicted.seconds_max == pytest.approx(
        fixed_before + fixed_after + runs_setup + scratch_max + imagenet_max, rel=1e-9
    )
    assert predicted.seconds_min == pytest.approx(sum(s.seconds_min for s in predicted.stages), rel=1e-12)
    assert [s.stage for s in predicted.stages][:2] == [
        "before the cost stage (start-up, cohort, ingest, split)",
        "cost stage",
    ]
    assert predicted.notes == []


def test_skipped_pretrained_runs_cost_a_skip_and_no_package(report: CostReport) -> None:
    full = hand.full_training_flops(SIZE, 1, 2)
    plan = WallTimePlan(runs=[
        PlannedRunWork(arm="scratch", max_epochs=10, min_epochs=10, n_images=100, image_size=SIZE),
        PlannedRunWork(arm="imagenet", max_epochs=10, min_epochs=6, n_images=100, image_size=SIZE, trained=False),
    ])
    predicted = cost_wall_time.predict_wall_time(report, plan, cost_stage_seconds=0.0)
    # nothing spent before; scratch (10 epochs x 1.23 + warm-up + 3.2 set-up) + one skip 0.45
    # + 1 arm's evaluation 0.5, package 4.1, int8 18.0, saliency 3.2 + 0.9, report 5.8
    expected = 1.23 * 10 * 100 * full / RATE + WARMUP + 3.2 + 0.45 + 0.5 + 4.1 + 18.0 + 3.2 + 0.9 + 5.8
    assert predicted.seconds_min == predicted.seconds_max == pytest.approx(expected, rel=1e-9)
    assert "priced as skipped" in predicted.notes[0]


def test_a_linear_probe_run_is_its_feature_pass_and_fit_plus_its_own_set_up() -> None:
    inputs = cost_estimate.resolve_cost_inputs(n_images=100, image_size=SIZE, epochs=10, arms=["imagenet-linear"])
    linear_report = cost_estimate.build_cost_report(inputs, calibration=_calibration())
    plan = WallTimePlan(
        runs=[PlannedRunWork(arm="imagenet-linear", max_epochs=1, min_epochs=1, n_images=100, image_size=SIZE)]
    )
    predicted = cost_wall_time.predict_wall_time(linear_report, plan, cost_stage_seconds=0.0)
    arm = linear_report.arm("imagenet-linear")
    # one no-grad feature pass + the logistic fit, x 1.23, + warm-up + the linear run's 12.5 s set-up
    compute = (100 * arm.forward_flops_per_image + arm.classifier_fit_flops) / RATE
    stage = next(s for s in predicted.stages if s.stage == "training imagenet-linear")
    assert stage.seconds_min == stage.seconds_max == pytest.approx(1.23 * compute + WARMUP + 12.5, rel=1e-9)


def test_the_plan_of_the_cpu_profile_stops_between_epoch_6_and_10_and_skips_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no cached weights
    plan = build_run_plan(profile="cpu", arms=["scratch", "imagenet", "imagenet-linear"], seed=0, fractions=[0.5, 1.0])
    work = cost_wall_time.wall_time_plan(
        plan, RunEnvironment(started_at=0.0), n_train_images=1000, elapsed_seconds=30.0
    )
    assert {(r.arm, r.n_images, r.min_epochs, r.max_epochs, r.trained) for r in work.runs} == {
        (arm, n, 6, 10, arm == "scratch") for arm in ("scratch", "imagenet", "imagenet-linear") for n in (500, 1000)
    }
    with_weights = cost_wall_time.wall_time_plan(
        plan, RunEnvironment(weights=tmp_path / "resnet50.pth", started_at=0.0), n_train_images=1000
    )
    assert (
        all(r.trained for r in with_weights.runs) and with_weights.elapsed_seconds == 0 and work.elapsed_seconds == 30.0
    )


class _Lines(logging.Handler):
    """Keeps the messages of the log records it receives."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_cost_flow_logs_the_prediction_and_stores_it_in_cost_json(report: CostReport, tmp_path: Path) -> None:
    from flows.cost import cost_flow

    plan = WallTimePlan(runs=[PlannedRunWork(arm="scratch", max_epochs=2, min_epochs=2, n_images=8, image_size=32)])
    inputs = cost_estimate.resolve_cost_inputs(n_images=8, image_size=32, epochs=2, arms=["scratch"])
    flow_logger, handler = logging.getLogger("prefect.flow_runs"), _Lines()
    level = flow_logger.level
    flow_logger.addHandler(handler)
    flow_logger.setLevel(logging.INFO)  # the tests run Prefect at WARNING
    try:
        result = cost_flow(inputs=inputs, out_dir=tmp_path, calibrate=False, wall_time_plan=plan)
    finally:
        flow_logger.removeHandler(handler)
        flow_logger.setLevel(level)
    line = next(text for text in handler.lines if text.startswith("Predicted wall time of this comparison: "))
    stored = CostReport.model_validate(json.loads((tmp_path / COST_FILE).read_text()))
    assert stored.wall_time == result.wall_time and stored.wall_time is not None
    assert line == wall_time_line(stored.wall_time)
    assert next(s for s in stored.wall_time.stages if s.stage == "cost stage").seconds_min > 0
    assert line in markdown_table(stored)


def test_a_comparison_logs_the_prediction_once_in_its_own_run_not_in_the_cost_subflow(tmp_path: Path) -> None:
    """As compare_flow does: cost_flow as a subflow stores the prediction, and the parent logs it (log_wall_time)
    with the calibration it used, once, under the parent's flow run."""
    from prefect import flow
    from prefect.context import get_run_context

    from flows.cost import cost_flow, log_wall_time

    plan = WallTimePlan(runs=[PlannedRunWork(arm="scratch", max_epochs=2, min_epochs=2, n_images=8, image_size=32)])
    inputs = cost_estimate.resolve_cost_inputs(n_images=8, image_size=32, epochs=2, arms=["scratch"])

    @flow(name="comparison-like")
    def parent() -> str:
        log_wall_time(cost_flow(inputs=inputs, out_dir=tmp_path, calibrate=False, wall_time_plan=plan))
        return str(get_run_context().flow_run.id)

    records: list[logging.LogRecord] = []
    handler = _Lines()
    handler.emit = records.append  # type: ignore[method-assign]
    flow_logger = logging.getLogger("prefect.flow_runs")
    level = flow_logger.level
    flow_logger.addHandler(handler)
    flow_logger.setLevel(logging.INFO)  # the tests run Prefect at WARNING
    try:
        parent_id = parent()
    finally:
        flow_logger.removeHandler(handler)
        flow_logger.setLevel(level)
    predicted = [r for r in records if r.getMessage().startswith("Predicted wall time of this comparison: ")]
    used = [r for r in records if r.getMessage().startswith("The wall-time prediction used ")]
    assert [str(r.flow_run_id) for r in predicted] == [parent_id], [r.getMessage() for r in records]
    assert [str(r.flow_run_id) for r in used] == [parent_id]
    assert "not calibrated" in used[0].getMessage()


def test_the_report_cost_section_shows_the_prediction(tmp_path: Path) -> None:
    from report_fixtures import make_example_results

    from data_schemas.cost import StageTime, WallTimeEstimate
    from reports.render import render_report

    estimate = WallTimeEstimate(
        seconds_min=290.0,
        seconds_max=410.0,
        formula="T = sum of stages",
        stages=[StageTime(stage="training scratch", seconds_min=290.0, seconds_max=410.0, basis="hand")],
    )
    results = make_example_results(with_folds=False, with_data_efficiency=False).model_copy(
        update={"predicted_wall_time": estimate}
    )
    paths = render_report(results, tmp_path)
    for key in ("markdown", "html"):
        text = " ".join(paths[key].read_text().split())
        cost_section = text[text.index("Cost: estimate vs actual"):]
        assert ("Predicted wall time of the whole comparison, made by the cost stage before training: 4.8 min to 6.8 "
                "min") in cost_section


def _first_epoch_folder(report: CostReport, root: Path, train_seconds: float) -> tuple[Path, str, Calibration]:
    """A comparison's report folder after a scratch run's first epoch (400 images at 64 px in batches of 8, epochs
    6..10, its training part train_seconds): cost.json with the prediction, plan.json, the run's config.json and
    metrics.csv; the calibration cached."""
    from data_schemas.files import write_model_json, write_models_csv
    from data_schemas.plan import write_plan
    from data_schemas.training import CONFIG_FILE, METRICS_FILE, EpochMetrics, RunConfig, TrainConfig

    work = PlannedRunWork(arm="scratch", max_epochs=10, min_epochs=6, n_images=400, image_size=SIZE)
    predicted = cost_wall_time.predict_wall_time(report, WallTimePlan(runs=[work]), cost_stage_seconds=1.0)
    write_model_json(root / COST_FILE, report.model_copy(update={"wall_time": predicted}))
    plan = build_run_plan(profile="smoke", arms=["scratch", "imagenet"], seed=0)
    plan_path, run = write_plan(root, plan), plan.runs[0].run_dir
    calibration = report.calibration
    config = RunConfig(
        arm="scratch", profile="cpu", seed=0, fold=0, folds=1,
        train=TrainConfig(image_size=SIZE, epochs=10, batch_size=8, lr=1e-3, min_epochs=6, early_stopping_patience=3),
        dataset_hash="ab" * 32, dataset_image_size=SIZE, splits_path="splits.csv", splits_sha256="0" * 64,
        classes=["normal", "abnormal"], positive_label="abnormal", n_train_images=400, n_val_images=20,
        n_test_images=20, n_train_patients=50, n_val_patients=10, n_test_patients=10, patient_overlap=0, device="cpu",
        precision=calibration.precision, channels_last=False, num_threads=calibration.threads, torch_version="2",
        torchvision_version="0", config_hash="c" * 64, created_at="2025-01-01T10:00:00+00:00",
    )
    (root / run).mkdir(parents=True)
    write_model_json(root / run / CONFIG_FILE, config)
    # the epoch's wall time also holds its validation, which the check leaves out
    write_models_csv(root / run / METRICS_FILE, [EpochMetrics(
        epoch=1, phase="full", images_per_second=400 / train_seconds, epoch_seconds=train_seconds + 30.0,
        elapsed_seconds=train_seconds + 30.0, is_best=True)], EpochMetrics)
    write_model_json(root / "cache" / "calibration.json", CalibrationCache(entries={calibration.key: calibration}))
    return plan_path, run, calibration


def test_a_first_epoch_twice_as_slow_corrects_the_estimates_and_drops_the_cached_calibration(
    report: CostReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.cost.first_epoch import _span as span, corrected_wall_time, first_epoch_watch

    full = hand.full_training_flops(SIZE, 1, 2)
    predicted_first = 400 * full / RATE + WARMUP  # the calibration's compute for the epoch's 400 images + warm-up
    epoch = 1.23 * 400 * full / RATE  # one later epoch as the wall-time prediction prices it
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path / "cache"))
    plan_path, run, calibration = _first_epoch_folder(report, tmp_path, train_seconds=2 * predicted_first)
    logger = logging.getLogger("test.first_epoch")
    caplog.set_level(logging.INFO, logger="test.first_epoch")
    watch = first_epoch_watch(plan_path, run, logger)
    assert watch is not None
    assert watch(2) is None  # not the first epoch: nothing judged
    assert not caplog.records
    judged_after = time.time()
    check = watch(1)
    [record] = caplog.records
    text = record.getMessage()
    assert record.levelno == logging.WARNING and "2.00x, more than 20% off" in text, text
    assert (f"the first epoch's training took {2 * predicted_first:.1f} s, predicted {predicted_first - WARMUP:.1f} s "
            f"to {predicted_first:.1f} s (without and with the first steps' warm-up) from the calibration measured "
            f"{calibration.measured_at}") in text, text
    # the run's remaining epochs (5 or 9 of them) twice as long; the comparison's training part too
    rest = f"remaining epochs about {span(2 * 5 * epoch, 2 * 9 * epoch)} (predicted {span(5 * epoch, 9 * epoch)})"
    assert rest in text, text
    stored = CostReport.model_validate(json.loads((tmp_path / COST_FILE).read_text())).wall_time
    training = [s for s in stored.stages if s.stage.startswith("training ")]
    low = stored.seconds_min + sum(s.seconds_min for s in training)
    high = stored.seconds_max + sum(s.seconds_max for s in training)
    assert f"the comparison about {span(low, high)} in all (predicted {span(stored.seconds_min, stored.seconds_max)})" \
        in text, text
    assert "the cached calibration is dropped" in text
    cache = CalibrationCache.model_validate(json.loads((tmp_path / "cache" / "calibration.json").read_text()))
    assert calibration.key not in cache.entries
    # the progress bars count down to the corrected figures: the run's from the check, the comparison's from the file
    assert check is not None and check.rest_left_s() == pytest.approx(2 * 9 * epoch, rel=1e-6)
    correction = corrected_wall_time(tmp_path, since=judged_after)
    assert correction is not None and (correction.arm, correction.run_dir) == ("scratch", run)
    assert (correction.seconds_min, correction.seconds_max) == pytest.approx((low, high), rel=1e-9)
    assert corrected_wall_time(tmp_path, since=time.time() + 60) is None  # one left by an earlier comparison


def test_the_comparisons_progress_counts_down_to_the_corrected_wall_time(tmp_path: Path) -> None:
    """ComparisonProgress: the prediction's end until a first epoch of this comparison corrects it; a correction an
    earlier comparison left in the folder is ignored."""
    from data_schemas.cost import StageTime, WallTimeCorrection, WallTimeEstimate
    from data_schemas.files import write_model_json
    from flows.compare_stages import ComparisonProgress

    started = time.time()
    training = StageTime(stage="training scratch", seconds_min=80, seconds_max=280, basis="rate x work")
    estimate = WallTimeEstimate(seconds_min=100.0, seconds_max=300.0, formula="f", stages=[training])
    progress = ComparisonProgress(2, tmp_path)
    progress.expect(estimate, started)
    stale = WallTimeCorrection(arm="scratch", run_dir="runs/scratch/main", ratio=2.0, seconds_min=180.0,
                               seconds_max=580.0, measured_at=started - 3600.0)
    write_model_json(tmp_path / WALL_TIME_CORRECTION_FILE, stale)
    progress.advance("cost estimated")
    assert progress.predicted_end == started + 300.0
    write_model_json(tmp_path / WALL_TIME_CORRECTION_FILE, stale.model_copy(update={"measured_at": started + 5.0}))
    progress.advance("training run runs/scratch/main finished")
    assert progress.predicted_end == started + 580.0


def test_a_first_epoch_within_20_percent_leaves_the_prediction_and_the_calibration(
    report: CostReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.cost.first_epoch import first_epoch_watch

    predicted_first = 400 * hand.full_training_flops(SIZE, 1, 2) / RATE + WARMUP
    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path / "cache"))
    plan_path, run, calibration = _first_epoch_folder(report, tmp_path, train_seconds=1.15 * predicted_first)
    caplog.set_level(logging.INFO, logger="test.first_epoch")
    check = first_epoch_watch(plan_path, run, logging.getLogger("test.first_epoch"))(1)
    [record] = caplog.records
    assert record.levelno == logging.INFO and "within 15%, the prediction stands" in record.getMessage()
    assert check is not None and check.rest_left_s() == check.rest_s[1]  # the bar keeps the prediction
    assert not (tmp_path / WALL_TIME_CORRECTION_FILE).exists()
    cache = CalibrationCache.model_validate(json.loads((tmp_path / "cache" / "calibration.json").read_text()))
    assert calibration.key in cache.entries
    assert first_epoch_watch(tmp_path / "elsewhere" / "plan.json", run, logging.getLogger("x")) is None  # no cost.json


def test_a_first_epoch_that_skipped_the_warm_up_is_not_called_fast(report: CostReport, tmp_path: Path) -> None:
    """Kernels this process already built: the epoch pays no warm-up, and the compute alone is still a match."""
    from data_schemas.files import read_models_csv
    from data_schemas.training import CONFIG_FILE, METRICS_FILE, EpochMetrics, RunConfig
    from tasks.cost.first_epoch import check_first_epoch

    compute = 400 * hand.full_training_flops(SIZE, 1, 2) / RATE
    _first_epoch_folder(report, tmp_path, train_seconds=compute)
    cost = CostReport.model_validate(json.loads((tmp_path / COST_FILE).read_text()))
    run_dir = next(tmp_path.rglob(CONFIG_FILE)).parent
    config = RunConfig.model_validate(json.loads((run_dir / CONFIG_FILE).read_text()))
    [first] = read_models_csv(run_dir / METRICS_FILE, EpochMetrics)
    check = check_first_epoch(cost, config, first)
    assert check is not None and check.predicted_s == pytest.approx((compute, compute + WARMUP))
    assert check.ratio == pytest.approx(1.0) and not check.disagrees
    fast = check_first_epoch(cost, config, first.model_copy(update={"images_per_second": 400 / (0.5 * compute)}))
    assert fast.ratio == pytest.approx(0.5) and fast.disagrees


def test_a_first_epoch_the_calibration_cannot_judge_is_left_alone(report: CostReport, tmp_path: Path) -> None:
    """A head-only epoch, other threads than the calibration's, or a training part under 5 s: not judged."""
    from data_schemas.files import read_models_csv
    from data_schemas.training import CONFIG_FILE, METRICS_FILE, EpochMetrics, RunConfig
    from tasks.cost.first_epoch import check_first_epoch

    _first_epoch_folder(report, tmp_path, train_seconds=100.0)
    cost = CostReport.model_validate(json.loads((tmp_path / COST_FILE).read_text()))
    run_dir = next(tmp_path.rglob(CONFIG_FILE)).parent
    config = RunConfig.model_validate(json.loads((run_dir / CONFIG_FILE).read_text()))
    [first] = read_models_csv(run_dir / METRICS_FILE, EpochMetrics)
    assert check_first_epoch(cost, config, first) is not None
    assert check_first_epoch(cost, config, first.model_copy(update={"phase": "head"})) is None
    assert check_first_epoch(cost, config.model_copy(update={"num_threads": config.num_threads + 1}), first) is None
    small = config.model_copy(update={"n_train_images": 40})  # 40 images: about 2 s of compute at this rate
    assert check_first_epoch(cost, small, first) is None
    assert check_first_epoch(cost.model_copy(update={"calibration": None}), config, first) is None


def test_a_first_epoch_is_not_judged_while_another_run_of_the_plan_trains(
    report: CostReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Parallel arms share the cores: a slow first epoch then says nothing about the calibration."""
    from data_schemas.training import STATUS_FILE
    from tasks.cost.first_epoch import first_epoch_watch
    from tasks.training.run_folder import write_status

    monkeypatch.setenv("CTCOMPARE_CACHE_DIR", str(tmp_path / "cache"))
    compute = 400 * hand.full_training_flops(SIZE, 1, 2) / RATE
    plan_path, run, calibration = _first_epoch_folder(report, tmp_path, train_seconds=3 * compute)
    other = next(r.run_dir for r in build_run_plan(profile="smoke", arms=["scratch", "imagenet"], seed=0).runs
                 if r.run_dir != run)
    write_status(tmp_path / other, arm="imagenet", status="running")
    assert (tmp_path / other / STATUS_FILE).is_file()
    caplog.set_level(logging.INFO, logger="test.first_epoch")
    first_epoch_watch(plan_path, run, logging.getLogger("test.first_epoch"))(1)
    assert not caplog.records
    cache = CalibrationCache.model_validate(json.loads((tmp_path / "cache" / "calibration.json").read_text()))
    assert calibration.key in cache.entries
    write_status(tmp_path / other, arm="imagenet", status="completed")
    first_epoch_watch(plan_path, run, logging.getLogger("test.first_epoch"))(1)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
