"""The compare flow's stages (flows/compare.py reads as their outline): the shared split and the plan, the cost
estimate, every training run (here or on a work pool), the evaluation, the model packages and pictures, the report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from data_schemas.cost import WallTimeEstimate
from data_schemas.files import atomic_write_text
from data_schemas.package import CompressionComparison
from data_schemas.plan import RunEnvironment, RunPlan, SplitSettings, with_cost_inputs, write_plan
from data_schemas.report import REPORT_HTML_FILE, ArmResult, ComparisonResults
from data_schemas.training import SPLITS_FILE
from data_schemas.visual import VisualSummary
from flows.cost import cost_flow, log_wall_time
from flows.heartbeats import no_heartbeats
from reports.render import render_report, update_index
from reports.wording import word_results
from tasks.common.progress import RunProgress
from tasks.common.reuse import REPORT_INPUTS_FILE, report_inputs_key, reusable_results
from tasks.cost.first_epoch import corrected_wall_time
from tasks.cost.wall_time import wall_time_plan
from tasks.ingest.dataset_store import load_dataset
from tasks.splits import SplitsMismatchError, ensure_splits, recorded_parts

if TYPE_CHECKING:
    from tasks.packaging.background import BackgroundWrites
    from tasks.packaging.package import LoadedPackage
    from tasks.packaging.ship import SameNetworkWork

# The stages that evaluate, train, package and picture import their modules (torch, scipy, matplotlib) when they
# run: a re-run that finds nothing changed keeps the last report without them.


def plan_with_split(plan: RunPlan, *, dataset_dir: Path, report_dir: Path) -> tuple[RunPlan, Path, int]:
    """The shared split made (or reused), then the plan given its cost inputs and written as plan.json; returns the
    plan, its path and the main run's training images."""
    n_train = prepare_split(dataset_dir=dataset_dir, splits_path=report_dir / SPLITS_FILE, settings=plan.split)
    plan = with_cost_inputs(plan, n_train_images=n_train)
    return plan, write_plan(report_dir, plan), n_train


@task(name="prepare-split", cache_policy=NO_CACHE)
def prepare_split(*, dataset_dir: Path, splits_path: Path, settings: SplitSettings) -> int:
    """Make (or reuse) the one patient-level split every arm shares; returns the main run's training images."""
    dataset = load_dataset(dataset_dir, in_memory=False)
    try:
        rows, _ = ensure_splits(
            manifest_rows=dataset.manifest,
            images=dataset.images,
            dataset_hash=dataset.card.content_hash,
            splits_path=splits_path,
            settings=settings,
        )
    except SplitsMismatchError as error:
        raise SplitsMismatchError(
            f"{splits_path.parent} holds a comparison made with other data or settings ({error}); "
            "give another output folder, or set new_folder_per_run for a new folder per run."
        ) from None
    return len(recorded_parts(rows, 0, settings)["train"])


@task(name="train-on-pool", cache_policy=NO_CACHE, task_run_name="train-on-pool-{label}")
def train_on_pool(deployment: str, label: str, parameters: dict[str, Any]) -> str:
    """One training run as its own flow run of `deployment` on a work pool; waits for it and returns its state."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, parameters=parameters, timeout=None)
    state = flow_run.state
    return state.name if state is not None else "UNKNOWN"


@task(name="evaluate-arms", cache_policy=NO_CACHE)
def evaluate_arms(
    *, plan: RunPlan, report_dir: Path, dataset_dir: Path, run_id: str, command: str
) -> ComparisonResults:
    """Pooled test metrics with patient-level intervals and paired tests, from the planned runs' validated outputs."""
    from tasks.evaluation.evaluate import ArmRunFolders, build_results

    return word_results(build_results(
        dataset_dir=dataset_dir, splits_path=report_dir / plan.splits_file,
        runs=ArmRunFolders.of_plan(plan, report_dir), evaluation=plan.evaluation, cost_path=report_dir / "cost.json",
        run_id=run_id, seed=plan.seed, command=command,
    ))


@task(name="render-report", cache_policy=NO_CACHE)
def write_report(results: ComparisonResults, report_dir: Path) -> Path:
    """report.html, report.md, results.json and the index of every report beside this one."""
    paths = render_report(results, report_dir)
    update_index(report_dir.parent)
    return paths["html"]


def _ship_arm(arm: ArmResult, *, plan: RunPlan, environment: RunEnvironment, results: ComparisonResults,
              report_dir: Path, dataset_dir: Path, budget_seconds: float,
              shared: SameNetworkWork) -> tuple[ArmResult, LoadedPackage, BackgroundWrites]:
    """Package the arm's main run at its validation-chosen patient threshold, measure what it costs to run and
    write it as a MONAI bundle too (tasks.packaging.ship.ship_run); with the package as written and its files'
    writes, which may still be under way."""
    from tasks.packaging.package import package_metrics
    from tasks.packaging.ship import ship_run

    run_dir = report_dir / plan.main_run(arm.name).run_dir
    point = arm.operating_point
    usable = point is not None and point.source != "fallback" and bool(point.patient_thresholds)
    # patient_thresholds follow the pooled runs in fold order: the first is the main run's (outer fold 0)
    threshold = point.patient_thresholds[0] if usable and point is not None else 0.5
    rule = plan.evaluation.operating_point if usable else "fixed:0.5 (fallback: no usable validation predictions)"
    metrics = package_metrics(arm, results.evaluation.mode)
    started = time.perf_counter()
    shipped = ship_run(run_dir=run_dir, dataset_dir=dataset_dir, threshold=threshold, threshold_rule=rule,
                       aggregation=plan.evaluation.aggregation,
                       metrics=metrics.model_dump() if metrics is not None else None,
                       weights_path=environment.weights, budget_seconds=budget_seconds, shared=shared)
    get_run_logger().info("%s: package, deployment cost and MONAI bundle in %.1f s", arm.name,
                          time.perf_counter() - started)
    packaged = arm.model_copy(update={"deployment": shipped.cost,
                                      "package_dir": shipped.package_dir.relative_to(report_dir).as_posix()})
    return packaged, shipped.package, shipped.written


def _compressed_arm(results: ComparisonResults) -> str | None:
    """The arm whose package gets a compressed variant: the recommended one, else the best."""
    return results.recommendation.preferred_arm or results.recommendation.best_arm


def _compress_recommended(results: ComparisonResults, *, plan: RunPlan, report_dir: Path, dataset_dir: Path,
                          budget_seconds: float,
                          package: LoadedPackage | None) -> tuple[CompressionComparison, str] | None:
    """The recommended (else best) arm's int8 (or bf16) package beside its full one (`package`: that package as
    shipped in this stage, else read from its folder), measured and compared; with the compressed package's folder
    relative to the report folder."""
    from tasks.packaging.ship import compress_and_compare

    name = _compressed_arm(results)
    arm = next((a for a in results.arms if a.name == name and a.deployment is not None), None)
    if arm is None:
        return None
    assert arm.deployment is not None  # selected above
    comparison, compressed = compress_and_compare(
        full_package=package or report_dir / arm.package_dir, dataset_dir=dataset_dir, full_cost=arm.deployment,
        budget_seconds=budget_seconds, tolerance=plan.evaluation.non_inferiority_margin,
        aggregation=plan.evaluation.aggregation, n_bootstrap=plan.evaluation.n_bootstrap, seed=plan.seed)
    return comparison, compressed.relative_to(report_dir).as_posix()


def _first_line(error: BaseException) -> str:
    """An error in one line for the log: its message's first line, else its type."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@task(name="ship-arms", cache_policy=NO_CACHE)
def ship_arms(*, plan: RunPlan, environment: RunEnvironment, results: ComparisonResults, report_dir: Path,
              dataset_dir: Path) -> ComparisonResults:
    """A model package (RUN_DIR/package: weights, recipe, threshold, MODEL_CARD.md) and MONAI bundle
    (RUN_DIR/bundle) per completed arm's main run, its deployment cost measured one arm at a time, and the
    recommended arm's compressed variant.

    An arm that cannot be packaged keeps its numbers and gets no cost (logged); the smoke profile times with
    QUICK_TIME_BUDGET_S (a tenth of a second per package: a few forwards), the others within DEFAULT_TIME_BUDGET_S;
    arms of the same network share one timing and one TorchScript trace (tasks.packaging.ship.SameNetworkWork); each
    piece is skipped when its inputs have not changed (tasks.packaging.ship). Files are written in the background
    while the next piece is made, never while a package is timed (tasks.packaging.background); an arm whose files
    could not be written goes without a package, as one that could not be packaged.
    """
    from tasks.packaging.deploy_cost import DEFAULT_TIME_BUDGET_S, QUICK_TIME_BUDGET_S
    from tasks.packaging.ship import SameNetworkWork

    logger = get_run_logger()
    started = time.perf_counter()
    budget = QUICK_TIME_BUDGET_S if plan.profile == "smoke" else DEFAULT_TIME_BUDGET_S
    arms, shared, to_compress, writing = [], SameNetworkWork(), None, []
    for arm in results.arms:
        try:
            if arm.status != "completed":
                arms.append(arm)
                continue
            shipped_arm, package, written = _ship_arm(arm, plan=plan, environment=environment, results=results,
                                                      report_dir=report_dir, dataset_dir=dataset_dir,
                                                      budget_seconds=budget, shared=shared)
            writing.append((len(arms), arm, written))
            arms.append(shipped_arm)
            to_compress = package if arm.name == _compressed_arm(results) else to_compress
        except Exception as error:  # noqa: BLE001 - one arm's package must not cost the whole report
            logger.warning("%s: no model package: %s", arm.name, _first_line(error))
            arms.append(arm)
    for position, arm, written in writing:  # an arm whose files could not be written goes without a package
        try:
            written.result()
        except Exception as error:  # noqa: BLE001
            logger.warning("%s: no model package: %s", arm.name, _first_line(error))
            arms[position] = arm
    shipped = results.model_copy(update={"arms": arms})
    compressing = time.perf_counter()
    try:
        compressed = _compress_recommended(shipped, plan=plan, report_dir=report_dir, dataset_dir=dataset_dir,
                                           budget_seconds=budget, package=to_compress)
    except Exception as error:  # noqa: BLE001
        logger.warning("No compressed variant: %s", _first_line(error))
        compressed = None
    logger.info("Shipped %d arm(s) in %.1f s, the compressed variant and its comparison %.1f s of it",
                sum(a.deployment is not None for a in arms), time.perf_counter() - started,
                time.perf_counter() - compressing)
    if compressed is None:
        return shipped
    return shipped.model_copy(update={"compression": compressed[0], "compression_package_dir": compressed[1]})


@task(name="visual-summary", cache_policy=NO_CACHE)
def visual_summary(
    *, plan: RunPlan, results: ComparisonResults, report_dir: Path, dataset_dir: Path
) -> VisualSummary | None:
    """Example images, GradCAM per completed network arm's main run on one slice selection, and the shortcut
    check when the dataset has lesions.csv; None when no network arm completed."""
    from tasks.evaluation.runs import is_linear
    from tasks.saliency.saliency import build_visual_summary

    runs = {arm.name: report_dir / plan.main_run(arm.name).run_dir for arm in results.completed_arms}
    if all(is_linear(name) for name in runs):
        get_run_logger().info("No visual section: no network arm completed.")
        return None
    return build_visual_summary(dataset_dir=dataset_dir, arm_runs=runs, seed=plan.seed)


class ComparisonProgress:
    """The comparison's progress artifact on its own run page: its stages and each training run, with time left:
    from the cost stage on, until the predicted wall time (its every-epoch end) runs out, the prediction's, or the
    prediction as a training run's first epoch corrected it (wall_time_correction.json); otherwise at the pace of the
    steps so far."""

    def __init__(self, n_runs: int, report_dir: Path | None = None) -> None:
        self.done, self.total = 0, n_runs + 4  # cost, the runs, evaluation, packages and pictures, the report
        self.bar = RunProgress(f"comparison: {n_runs} training run(s) planned")
        self.report_dir = report_dir
        self.started_at: float | None = None
        self.predicted_end: float | None = None

    def expect(self, estimate: WallTimeEstimate | None, started_at: float) -> None:
        """The predicted wall time of the comparison that started at started_at (epoch seconds)."""
        self.started_at = started_at
        self.predicted_end = started_at + estimate.seconds_max if estimate is not None else None

    def advance(self, what: str) -> None:
        """One more stage (or training run) finished: `what` it was."""
        self.done += 1
        if self.report_dir is not None and self.started_at is not None:
            correction = corrected_wall_time(self.report_dir, since=self.started_at)
            if correction is not None:
                self.predicted_end = self.started_at + correction.seconds_max
        left = self.predicted_end - time.time() if self.predicted_end is not None else None
        self.bar.update(self.done, self.total, f"comparison: {what} ({self.done}/{self.total} steps)",
                        left_s=left if left is not None and left > 0 else None)


def train_all(*, plan: RunPlan, environment: RunEnvironment, plan_path: Path, dataset_dir: Path, parallel_arms: int,
              train_deployment: str | None, stages: ComparisonProgress | None = None) -> None:
    """Run every planned training run, in this process or as flow runs of `train_deployment`; failures are
    logged and show up in the report from each run's status.json."""
    from tasks.training.train import train_arm_task

    logger = get_run_logger()
    started = time.perf_counter()
    with ThreadPoolTaskRunner(max_workers=len(plan.runs) if train_deployment else parallel_arms) as runner:
        futures = []
        for planned in plan.runs:
            parameters = {"dataset_dir": dataset_dir, "plan_path": plan_path, "run": planned.run_dir,
                          "weights_path": environment.weights, "resume": True}
            if train_deployment:
                label = planned.run_dir.removeprefix("runs/").replace("/", "-")
                as_json = {key: str(value) if isinstance(value, Path) else value for key, value in parameters.items()}
                futures.append(
                    runner.submit(
                        train_on_pool, {"deployment": train_deployment, "label": label, "parameters": as_json}
                    )
                )
            else:
                futures.append(runner.submit(train_arm_task, parameters))
        for planned, future in zip(plan.runs, futures):
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                logger.warning("A training run failed: %s", _first_line(outcome))
            if stages is not None:
                stages.advance(f"training run {planned.run_dir} finished")
    logger.info("Training stage: %d run(s) in %.1f s", len(plan.runs), time.perf_counter() - started)


def add_packages_and_pictures(*, plan: RunPlan, environment: RunEnvironment, results: ComparisonResults,
                              report_dir: Path, dataset_dir: Path) -> ComparisonResults:
    """Model packages with deployment costs, then the visual section; either may fail alone (logged) and the
    report is written without it."""
    logger = get_run_logger()
    shipped = ship_arms(plan=plan, environment=environment, results=results, report_dir=report_dir,
                        dataset_dir=dataset_dir, return_state=True)
    if shipped.is_completed():
        results = shipped.result()
    else:
        logger.warning("No model packages: %s", shipped.message or shipped.name)
    visual = visual_summary(
        plan=plan, results=results, report_dir=report_dir, dataset_dir=dataset_dir, return_state=True
    )
    if visual.is_completed():
        return results.model_copy(update={"visual": visual.result()})
    logger.warning("No visual section: %s", visual.message or visual.name)
    return results


def estimate_cost(plan: RunPlan, environment: RunEnvironment, n_train_images: int, *, report_dir: Path,
                  calibrate: bool, stages: ComparisonProgress) -> None:
    """cost.json for the plan (the cost flow) and the comparison's predicted wall time from its n_train_images,
    logged on this run."""
    with no_heartbeats():  # a subflow: the calling run has the heartbeat
        cost = cost_flow(inputs=plan.cost, out_dir=report_dir, calibrate=calibrate,
                         wall_time_plan=wall_time_plan(plan, environment, n_train_images=n_train_images,
                                                       elapsed_seconds=time.time() - environment.started_at))
    log_wall_time(cost)
    stages.expect(cost.wall_time, environment.started_at)
    stages.advance("cost estimated")


def report_results(*, plan: RunPlan, environment: RunEnvironment, report_dir: Path, dataset_dir: Path, run_id: str,
                   command: str, stages: ComparisonProgress) -> tuple[ComparisonResults, Path]:
    """The comparison's results and report.html: the last run's, kept when nothing the report is made from has
    changed (tasks.common.reuse), else evaluated, packaged, pictured and written anew."""
    key = report_inputs_key(plan=plan, report_dir=report_dir, dataset_dir=dataset_dir, command=command)
    results = reusable_results(report_dir, key)
    if results is not None:
        get_run_logger().info("Nothing the report is made from has changed: evaluation, packages, pictures and "
                              "report kept")
        stages.advance("arms evaluated")
        stages.advance("packages and pictures made")
        return results, report_dir / REPORT_HTML_FILE
    (report_dir / REPORT_INPUTS_FILE).unlink(missing_ok=True)
    results = evaluate_arms(plan=plan, report_dir=report_dir, dataset_dir=dataset_dir, run_id=run_id, command=command)
    stages.advance("arms evaluated")
    results = add_packages_and_pictures(plan=plan, environment=environment, results=results, report_dir=report_dir,
                                        dataset_dir=dataset_dir)
    stages.advance("packages and pictures made")
    html = write_report(results, report_dir)
    atomic_write_text(report_dir / REPORT_INPUTS_FILE, json.dumps({"inputs_sha256": key}) + "\n")
    return results, html
