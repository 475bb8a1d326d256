"""The main job: DICOM folder (or dataset) -> ingest -> plan + split -> cost -> train every run -> evaluate -> report.

The compare flow (its commands: flows/cli/compare.py and flows/cli/demo.py). REPORT_DIR holds the report (report.html,
report.md, results.json, figures/) and the stage files it was built from: plan.json (every setting, resolved once),
splits.csv, cost.json and runs/<arm>/<run>/. When SOURCE is a DICOM folder the dataset is ingested BESIDE the report
folder, never inside it (REPORT_DIR/../<name>-dataset; with new_folder_per_run, OUT_DIR/dataset above the per-run
folders), so nothing private lies under a folder meant to be shared. index.html in REPORT_DIR's parent lists every
report there.

Re-runs. Every stage skips what has not changed: the ingest reads only new files, the split and cost.json are reused,
completed runs are not trained again, and when nothing the report is made from has changed (plan, split, dataset,
every run's outputs, cost estimates, the command and the code) the evaluation, the packages,
the pictures and the report of the last run are kept (tasks.common.reuse; REPORT_DIR/report_inputs.json).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from data_schemas.arms import ArmName
from data_schemas.dataset import DATASET_CARD_FILE, DatasetCard
from data_schemas.files import atomic_write_text, printable_path
from data_schemas.package import PACKAGE_DIR, CompressionComparison
from data_schemas.plan import RunEnvironment, RunPlan, SplitSettings, build_run_plan, with_cost_inputs, write_plan
from data_schemas.report import (
    REPORT_HTML_FILE,
    REPORT_LOCK_FILE,
    ArmResult,
    ComparisonResults,
    outermost_report_folder,
)
from data_schemas.training import SPLITS_FILE
from data_schemas.visual import VisualSummary
from flows.cost import cost_flow, log_wall_time
from flows.ingest import ingest_flow
from flows.lifeline import command_started_at
from flows.parameters import (
    Arms,
    Bootstrap,
    Calibrate,
    CheckedPlan,
    CompareLabels,
    CompareSource,
    Folds,
    Fractions,
    IngestSize,
    NewFolderPerRun,
    OldIngestSizeName,
    ParallelArms,
    Profile,
    ReportFolder,
    Seed,
    Settings,
    TrainDeployment,
    TrainSizes,
    WeightsFile,
    as_seen,
    check_weights_loadable,
)
from flows.run_logs import refused, send_run_logs_now, tidy_run_logs
from flows.serve import BASE_URL_ENV, report_url
from reports.render import metrics_table, render_report, summary_markdown, update_index
from reports.wording import word_results
from tasks.common.paths import refuse_non_folder
from tasks.common.progress import RunProgress
from tasks.common.reuse import REPORT_INPUTS_FILE, report_inputs_key, reusable_results
from tasks.cost.wall_time import wall_time_plan
from tasks.evaluation.evaluate import build_results
from tasks.ingest.dataset_store import load_dataset
from tasks.packaging.bundle import BUNDLE_DIR, write_bundle_task
from tasks.packaging.deploy_cost import DEFAULT_TIME_BUDGET_S, QUICK_TIME_BUDGET_S
from tasks.packaging.package import package_metrics
from tasks.packaging.ship import compress_and_compare, ship_run
from tasks.saliency.saliency import build_visual_summary
from tasks.splits import SplitsMismatchError, ensure_splits, parts_for_fold
from tasks.training.train import train_arm_task

DEFAULT_ARMS: list[ArmName] = ["scratch", "imagenet", "imagenet-linear"]
SUMMARY_KEY, METRICS_KEY, LINK_KEY = "ctcompare-summary", "ctcompare-metrics", "ctcompare-report-link"
PARTIAL_STATE_NAME = "Partial"
# How long a second comparison into the same report folder waits for the first before refusing: long enough for
# two started together to settle which one runs, far shorter than a comparison.
REPORT_LOCK_TIMEOUT_S = 30.0
NO_PACKAGE = "no package"  # a completed arm's outcome when its model package is missing or failed its check


class ComparisonNotComplete(RuntimeError):
    """Some requested arm did not complete: the data of the comparison's "Partial" (or Failed) state, which a
    deployment's flow-run process can raise as an error (a plain dict it cannot); `summary` still names the report."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message, summary)  # both in args, so the error pickles with its summary

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def summary(self) -> dict[str, Any]:
        """The flow's summary dict (report, link, arms)."""
        return self.args[1]


class NoArmCompletedError(ComparisonNotComplete):
    """No requested arm completed: the comparison's flow run ends Failed."""


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
    return len(parts_for_fold(rows, 0, settings)["train"])


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
    fractions = {arm: {r.train_fraction: report_dir / r.run_dir for r in plan.fraction_runs(arm)} for arm in plan.arms}
    sizes = {arm: {r.config.image_size: report_dir / r.run_dir for r in plan.size_runs(arm)} for arm in plan.arms}
    return word_results(build_results(
        dataset_dir=dataset_dir, splits_path=report_dir / plan.splits_file,
        arm_runs={arm: [report_dir / r.run_dir for r in plan.pooled_runs(arm)] for arm in plan.arms},
        evaluation=plan.evaluation, cost_path=report_dir / "cost.json", run_id=run_id, seed=plan.seed, command=command,
        fraction_dirs=fractions if any(len(runs) > 1 for runs in fractions.values()) else None,
        size_dirs=sizes if plan.sizes else None,
    ))


@task(name="render-report", cache_policy=NO_CACHE)
def write_report(results: ComparisonResults, report_dir: Path) -> Path:
    """report.html, report.md, results.json and the index of every report beside this one."""
    paths = render_report(results, report_dir)
    update_index(report_dir.parent)
    return paths["html"]


def _ship_arm(arm: ArmResult, *, plan: RunPlan, environment: RunEnvironment, results: ComparisonResults,
              report_dir: Path, dataset_dir: Path, budget_seconds: float) -> ArmResult:
    """Package the arm's main run at its validation-chosen patient threshold and measure what it costs to run."""
    run_dir = report_dir / plan.main_run(arm.name).run_dir
    point = arm.operating_point
    usable = point is not None and point.source != "fallback" and bool(point.patient_thresholds)
    # patient_thresholds follow the pooled runs in fold order: the first is the main run's (outer fold 0)
    threshold = point.patient_thresholds[0] if usable and point is not None else 0.5
    rule = plan.evaluation.operating_point if usable else "fixed:0.5 (fallback: no usable validation predictions)"
    metrics = package_metrics(arm, results.evaluation.mode)
    shipped = ship_run(run_dir=run_dir, dataset_dir=dataset_dir, threshold=threshold, threshold_rule=rule,
                       aggregation=plan.evaluation.aggregation,
                       metrics=metrics.model_dump() if metrics is not None else None,
                       weights_path=environment.weights, budget_seconds=budget_seconds)
    write_bundle_task(run_dir / PACKAGE_DIR, run_dir / BUNDLE_DIR)  # the same model as a MONAI bundle
    return arm.model_copy(update={"deployment": shipped.cost,
                                  "package_dir": shipped.package_dir.relative_to(report_dir).as_posix()})


def _compress_recommended(results: ComparisonResults, *, plan: RunPlan, report_dir: Path, dataset_dir: Path,
                          budget_seconds: float) -> tuple[CompressionComparison, str] | None:
    """The recommended (else best) arm's int8 (or bf16) package beside its full one, measured and compared; with
    the compressed package's folder relative to the report folder."""
    name = results.recommendation.preferred_arm or results.recommendation.best_arm
    arm = next((a for a in results.arms if a.name == name and a.deployment is not None), None)
    if arm is None:
        return None
    assert arm.deployment is not None  # selected above
    comparison, compressed = compress_and_compare(
        full_package=report_dir / arm.package_dir, dataset_dir=dataset_dir, full_cost=arm.deployment,
        budget_seconds=budget_seconds, tolerance=plan.evaluation.non_inferiority_margin,
        aggregation=plan.evaluation.aggregation, n_bootstrap=plan.evaluation.n_bootstrap, seed=plan.seed)
    return comparison, compressed.relative_to(report_dir).as_posix()


@task(name="ship-arms", cache_policy=NO_CACHE)
def ship_arms(*, plan: RunPlan, environment: RunEnvironment, results: ComparisonResults, report_dir: Path,
              dataset_dir: Path) -> ComparisonResults:
    """A model package (RUN_DIR/package: weights, recipe, threshold, MODEL_CARD.md) per completed arm's main run,
    its deployment cost measured one arm at a time, and the recommended arm's compressed variant.

    An arm that cannot be packaged keeps its numbers and gets no cost (logged); the smoke profile times with
    QUICK_TIME_BUDGET_S (about a second per package), the others within DEFAULT_TIME_BUDGET_S; each piece is
    skipped when its inputs have not changed (tasks.packaging.ship).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    budget = QUICK_TIME_BUDGET_S if plan.profile == "smoke" else DEFAULT_TIME_BUDGET_S
    arms = []
    for arm in results.arms:
        try:
            arms.append(_ship_arm(arm, plan=plan, environment=environment, results=results, report_dir=report_dir,
                                  dataset_dir=dataset_dir, budget_seconds=budget) if arm.status == "completed" else arm)
        except Exception as error:  # noqa: BLE001 - one arm's package must not cost the whole report
            logger.warning(
                "%s: no model package: %s", arm.name, str(error).splitlines()[0] if str(error) else type(error).__name__
            )
            arms.append(arm)
    shipped = results.model_copy(update={"arms": arms})
    try:
        compressed = _compress_recommended(shipped, plan=plan, report_dir=report_dir, dataset_dir=dataset_dir,
                                           budget_seconds=budget)
    except Exception as error:  # noqa: BLE001
        logger.warning("No compressed variant: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        compressed = None
    logger.info(
        "Shipped %d arm(s) in %.1f s", sum(a.deployment is not None for a in arms), time.perf_counter() - started
    )
    if compressed is None:
        return shipped
    return shipped.model_copy(update={"compression": compressed[0], "compression_package_dir": compressed[1]})


@task(name="visual-summary", cache_policy=NO_CACHE)
def visual_summary(
    *, plan: RunPlan, results: ComparisonResults, report_dir: Path, dataset_dir: Path
) -> VisualSummary | None:
    """Example images, GradCAM per completed network arm's main run on one slice selection, and the shortcut
    check when the dataset has lesions.csv; None when no network arm completed."""
    runs = {arm.name: report_dir / plan.main_run(arm.name).run_dir for arm in results.completed_arms}
    if not any(name != "imagenet-linear" for name in runs):
        get_run_logger().info("No visual section: no network arm completed.")
        return None
    return build_visual_summary(dataset_dir=dataset_dir, arm_runs=runs, seed=plan.seed)


def check_compare_paths(*, source: Path, report_dir: Path, labels: Path | None, weights: Path | None) -> None:
    """Refuse missing inputs and an unusable output folder with one sentence before any work starts."""
    if not source.exists():
        raise ValueError(f"{source} does not exist; give a DICOM folder or a dataset folder made by 'ctcompare ingest' "
                         "(the ingest/nightly deployment writes data/dataset).")
    if not source.is_dir():
        raise ValueError(f"{source} is a file; give a DICOM folder or a dataset folder made by 'ctcompare ingest'.")
    if not os.access(source, os.R_OK | os.X_OK):
        raise ValueError(f"{source} cannot be read (permission denied); give a folder you can read.")
    if not (source / "dataset.json").is_file():
        check_dicom_source(source, labels)
    else:
        check_dataset_labels(source)
    if labels is not None and not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist.")
    if weights is not None and not weights.is_file():
        raise ValueError(f"weights file {weights} does not exist.")
    refuse_non_folder(report_dir, "output")
    enclosing = outermost_report_folder(report_dir.parent)
    if enclosing is not None:
        raise ValueError(f"--out {report_dir} lies inside the report folder {enclosing}; give a folder outside it, "
                         "so that each report can be shared alone.")


def check_dataset_labels(dataset_dir: Path) -> None:
    """A dataset source must hold labelled images of at least two classes: refused otherwise, naming the ingest to
    fix (a dataset ingested without its labels file has none)."""
    try:
        card = DatasetCard.model_validate_json((dataset_dir / DATASET_CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the dataset's own reader says what is wrong with it, in its stage
    classes = sorted(label for label, count in card.label_distribution.items() if label and count)
    if len(classes) >= 2:
        return
    found = f"labelled images of one class only ({classes[0]})" if classes else "no labelled image"
    raise ValueError(
        f"dataset {dataset_dir} holds {found} and {card.n_unlabeled_images} unlabelled image(s); a comparison needs "
        "labelled images of two classes: run its ingest again with a labels file (--labels on the command line, the "
        "labels parameter of the ingest/nightly deployment, which writes data/dataset as shipped)."
    )


def check_dicom_source(source: Path, labels: Path | None) -> None:
    """A DICOM source must hold a file, and compare needs its labels (it trains on labelled images only): refused
    without --labels, naming a labels.csv found inside or beside the folder."""
    if next((path for path in source.rglob("*") if path.is_file()), None) is None:
        raise ValueError(f"source folder {source} holds no file; give a DICOM folder or a dataset folder made by "
                         "'ctcompare ingest'.")
    if labels is None:
        found = next((path for path in (source / "labels.csv", source.parent / "labels.csv") if path.is_file()), None)
        if found is not None:
            raise ValueError(f"a DICOM source needs --labels (compare trains on labelled images only); {found} is "
                             f"there: add --labels {found}.")
        raise ValueError("a DICOM source needs --labels, a labels CSV (see 'ctcompare ingest --help'): compare trains "
                         "on labelled images only.")


def dataset_folder(out_dir: Path, new_folder_per_run: bool) -> Path:
    """Where a DICOM source is ingested: beside the report folder, never inside it (re-runs ingest incrementally)."""
    return out_dir / "dataset" if new_folder_per_run else out_dir.parent / f"{out_dir.name}-dataset"


class ReportBusyError(RuntimeError):
    """Another comparison holds the report folder's write lock for longer than this one will wait."""


def report_write_lock(report_dir: Path) -> FileLock:
    """The report folder's write lock (REPORT_LOCK_FILE, via filelock): one comparison writes a report folder at a
    time, so no run reads another's plan.json or overwrites its packages. Re-entrant within a process (the command
    line takes it before Prefect starts, the flow again); entering it waits at most REPORT_LOCK_TIMEOUT_S, then
    raises ReportBusyError with one sentence."""
    return _ReportLock(str(Path(report_dir).resolve() / REPORT_LOCK_FILE), timeout=REPORT_LOCK_TIMEOUT_S,
                       thread_local=False, is_singleton=True)


class _ReportLock(FileLock):
    """FileLock whose timeout is ReportBusyError, a sentence naming the report folder."""

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().acquire(*args, **kwargs)
        except Timeout:
            folder = Path(self.lock_file).parent
            raise ReportBusyError(
                f"report folder {printable_path(folder)} is being written by another comparison (waited "
                f"{REPORT_LOCK_TIMEOUT_S:g} s); run again when it has finished, or give another --out."
            ) from None


class ComparisonProgress:
    """The comparison's progress artifact on its own run page: its stages and each training run, with time left."""

    def __init__(self, n_runs: int) -> None:
        self.done, self.total = 0, n_runs + 4  # cost, the runs, evaluation, packages and pictures, the report
        self.bar = RunProgress(f"comparison: {n_runs} training run(s) planned")

    def advance(self, what: str) -> None:
        """One more stage (or training run) finished: `what` it was."""
        self.done += 1
        self.bar.update(self.done, self.total, f"comparison: {what} ({self.done}/{self.total} steps)")


def train_all(*, plan: RunPlan, environment: RunEnvironment, plan_path: Path, dataset_dir: Path, parallel_arms: int,
              train_deployment: str | None, stages: ComparisonProgress | None = None) -> None:
    """Run every planned training run, in this process or as flow runs of `train_deployment`; failures are
    logged and show up in the report from each run's status.json."""
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
                logger.warning(
                    "A training run failed: %s",
                    str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__,
                )
            if stages is not None:
                stages.advance(f"training run {planned.run_dir} finished")
    logger.info("Training stage: %d run(s) in %.1f s", len(plan.runs), time.perf_counter() - started)


def rerun_command(*, source: str, out_dir: str, labels: str | None, plan: RunPlan, environment: RunEnvironment,
                  settings: dict[str, str] | None, folds: int | None, fractions: list[float] | None) -> str:
    """The command line that repeats this comparison as shown: paths as given, the weights file by name (the report
    prints its SHA-256 beside it), every --set override."""
    argv = ["ctcompare", "compare", source, "--out", out_dir] + (["--labels", labels] if labels else [])
    argv += ["--profile", plan.profile, "--arms", *plan.arms, "--seed", str(plan.seed)]
    argv += ["--weights", environment.weights.name] if environment.weights else []
    argv += ["--folds", str(folds)] if folds else []
    argv += ["--fractions", ",".join(f"{f:g}" for f in fractions)] if fractions else []
    argv += ["--sizes", ",".join(str(s) for s in plan.sizes)] if plan.sizes else []
    for key, value in sorted((settings or {}).items()):
        argv += ["--set", f"{key}={value}"]
    return shlex.join(argv + ["--bootstrap", str(plan.evaluation.n_bootstrap)])


def _publish(results: ComparisonResults, html: Path, link: str) -> None:
    """The Prefect artifacts of a comparison: summary, metrics table, link to the report (http:// when served)."""
    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(results, report_link=link),
                             description="Comparison summary and recommendation")
    create_table_artifact(key=METRICS_KEY, table=metrics_table(results), description="Test metrics per arm (95% CI by "
                                                                                     "patient)")
    create_link_artifact(key=LINK_KEY, link=link, link_text="report.html", description="The full comparison report")


@flow(name="compare")
def compare_flow(
    source: CompareSource,
    out_dir: ReportFolder,
    labels: CompareLabels = None,
    profile: Profile = "cpu",
    arms: Arms = DEFAULT_ARMS,
    weights: WeightsFile = None,
    seed: Seed = 0,
    folds: Folds = None,
    fractions: Fractions = None,
    sizes: TrainSizes = None,
    settings: Settings = None,
    ingest_size: IngestSize = 224,
    bootstrap: Bootstrap = 1000,
    calibrate: Calibrate = True,
    parallel_arms: ParallelArms = 1,
    new_folder_per_run: NewFolderPerRun = False,
    train_deployment: TrainDeployment = None,
    plan: CheckedPlan = None,
    image_size: OldIngestSizeName = None,
) -> State:
    """Train ResNet-50 from scratch and from ImageNet weights on the same patients and report which wins.

    A DICOM source is ingested once, at the largest of ingest_size and sizes, beside the report folder. Inputs are
    checked before any work: a missing file or a weights file that does not load stops the run in one sentence.
    The run ends Completed when every requested arm completed; "Partial" when some did not and the others are
    compared (grey when they were skipped, red when one failed); Failed when none completed. Its last log line
    gives the report's address.
    """
    # `plan` is the run plan the command line already resolved from these parameters; without it, resolved here.
    # A Completed state's data is the summary dict, which a direct call returns; any other state's data is a
    # ComparisonNotComplete holding it (a direct call raises it).
    tidy_run_logs(ComparisonNotComplete)
    logger = get_run_logger()
    ingest_size = _ingest_size(ingest_size, image_size)
    environment = RunEnvironment(weights=Path(weights).resolve() if weights else None,
                                 started_at=command_started_at() or time.time())
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    src, out = Path(source).resolve(), Path(out_dir).resolve()
    report_dir = out / run_id if new_folder_per_run else out
    try:  # one sentence, in the words of where the run came from (`weights` in a flow run, `--weights` in a terminal)
        check_compare_paths(source=src, report_dir=report_dir, labels=Path(labels) if labels else None,
                            weights=Path(weights) if weights else None)
        if plan is None:  # the command line checked its plan and weights file already
            plan = comparison_plan(profile=profile, arms=arms, seed=seed, settings=settings, folds=folds,
                                   fractions=fractions, sizes=sizes, bootstrap=bootstrap)
            check_weights_loadable(weights)
    except ValueError as error:
        return refused(as_seen(str(error)))
    report_dir.mkdir(parents=True, exist_ok=True)
    with report_write_lock(report_dir):  # one comparison writes a report folder at a time
        dataset_dir = ingest_source(src, out, labels=labels, size=max([ingest_size, *plan.sizes]),
                                    new_folder_per_run=new_folder_per_run)

        n_train = prepare_split(dataset_dir=dataset_dir, splits_path=report_dir / SPLITS_FILE, settings=plan.split)
        plan = with_cost_inputs(plan, n_train_images=n_train)
        plan_path = write_plan(report_dir, plan)
        stages = ComparisonProgress(len(plan.runs))
        cost = cost_flow(inputs=plan.cost, out_dir=report_dir, calibrate=calibrate,
                         wall_time_plan=wall_time_plan(plan, environment, n_train_images=n_train,
                                                       elapsed_seconds=time.time() - environment.started_at))
        log_wall_time(cost)
        stages.advance("cost estimated")

        train_all(plan=plan, environment=environment, plan_path=plan_path, dataset_dir=dataset_dir,
                  parallel_arms=parallel_arms, train_deployment=train_deployment, stages=stages)
        command = rerun_command(source=source, out_dir=out_dir, labels=labels, plan=plan, environment=environment,
                                settings=settings, folds=folds, fractions=fractions)
        key = report_inputs_key(plan=plan, report_dir=report_dir, dataset_dir=dataset_dir, command=command)
        results = reusable_results(report_dir, key)
        if results is not None:
            html = report_dir / REPORT_HTML_FILE
            logger.info("Nothing the report is made from has changed: evaluation, packages, pictures and report kept")
            stages.advance("arms evaluated")
            stages.advance("packages and pictures made")
        else:
            (report_dir / REPORT_INPUTS_FILE).unlink(missing_ok=True)
            results = evaluate_arms(plan=plan, report_dir=report_dir, dataset_dir=dataset_dir, run_id=run_id,
                                    command=command)
            stages.advance("arms evaluated")
            results = add_packages_and_pictures(plan=plan, environment=environment, results=results,
                                                report_dir=report_dir, dataset_dir=dataset_dir)
            stages.advance("packages and pictures made")
            html = write_report(results, report_dir)
            atomic_write_text(report_dir / REPORT_INPUTS_FILE, json.dumps({"inputs_sha256": key}) + "\n")
        link = report_url(html, report_dir.parent)
        _publish(results, html, link)
        stages.advance("report written")
        if link.startswith("file:"):
            logger.warning("The report link is a file:// path, which a browser does not open from the Prefect UI: "
                           "run `make server` (it serves out/reports), write the report under the served folder, or "
                           "set %s.", BASE_URL_ENV)
        outcomes = arm_outcomes(results)
        logger.info("%s", outcome_headline(results, outcomes))
        logger.info("Report: %s", link)
        send_run_logs_now()  # the last line of `--watch` before the final state
        return final_state(results, {"report": str(html), "link": link, "report_dir": str(report_dir),
                                     "recommendation": outcome_headline(results, outcomes), "arms": outcomes})


def _ingest_size(ingest_size: int, image_size: int | None) -> int:
    """ingest_size, or image_size (its old name) when a deployment made before the rename passes it: said once."""
    if image_size is None:
        return ingest_size
    get_run_logger().warning("Parameter image_size is the old name of ingest_size (the size DICOM images are stored "
                             "at in the dataset); this run uses ingest_size=%d. Rename it in the deployment.",
                             image_size)
    return image_size


def comparison_plan(*, profile: str, arms: list[str], seed: int, settings: dict[str, str] | None = None,
                    folds: int | None = None, fractions: list[float] | None = None, sizes: list[int] | None = None,
                    bootstrap: int = 1000) -> RunPlan:
    """The run plan of a comparison from the compare flow's parameters of the same names; ValueError (one
    sentence) for a bad profile, arm, size or setting. The command line resolves it with this, once."""
    return build_run_plan(profile=profile, arms=list(arms), seed=seed, settings=settings, folds=folds,
                          fractions=fractions, sizes=sizes, n_bootstrap=bootstrap)


def ingest_source(src: Path, out: Path, *, labels: str | None, size: int, new_folder_per_run: bool) -> Path:
    """The dataset folder of a comparison: src itself when it is one, else src's DICOM files ingested beside the
    report folder at `size` (the largest size trained: smaller ones are resized from it,
    tasks.training.models.resize_images)."""
    if (src / "dataset.json").is_file():
        return src
    dataset_dir = dataset_folder(out, new_folder_per_run)
    ingest_flow(src_dir=str(src), out_dir=str(dataset_dir), labels=labels, size=size)
    return dataset_dir


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


def arm_outcomes(results: ComparisonResults) -> dict[str, str]:
    """Each requested arm's outcome: its status, except that a completed arm without its model package (it could not
    be written, or failed its own hash check) is "no package": the comparison did not deliver it."""
    return {arm.name: NO_PACKAGE if arm.status == "completed" and arm.package_dir is None else arm.status
            for arm in results.arms}


def outcome_headline(results: ComparisonResults, outcomes: dict[str, str]) -> str:
    """The recommendation's headline, followed by a sentence naming the arms that have no model package."""
    unshipped = [name for name, outcome in outcomes.items() if outcome == NO_PACKAGE]
    if not unshipped:
        return results.recommendation.headline
    return (f"{results.recommendation.headline} No model package for {', '.join(unshipped)}: it could not be written "
            "or failed its own hash check (the log says which).")


def not_completed(summary: dict[str, Any]) -> list[str]:
    """'arm (status)' for every requested arm of a comparison summary that did not complete."""
    return [f"{name} ({status})" for name, status in summary["arms"].items() if status != "completed"]


def final_state(results: ComparisonResults, summary: dict[str, Any]) -> State:
    """The comparison's state, never the green of a success unless every requested arm completed; its data the
    summary (a ComparisonNotComplete holding it unless Completed).

    Completed: every arm completed. "Partial": some arm did not, the others are compared: Cancelled type (grey in
    the UI's runs list and chart) when the rest were skipped, Failed type (red) when one failed. Failed: no arm
    completed. The message ends with the report's address, so the run's last log line carries it.
    """
    missing = not_completed(summary)
    report = f"Report: {summary['link']}"
    if not results.completed_arms:
        message = f"No requested arm completed: {', '.join(missing)}; the report says why. {report}"
        return Failed(message=message, data=NoArmCompletedError(message, summary))
    if missing:
        kind = Failed if "failed" in summary["arms"].values() else Cancelled
        message = f"Partial comparison: {', '.join(missing)} did not complete; the others are compared. {report}"
        return kind(name=PARTIAL_STATE_NAME, data=ComparisonNotComplete(message, summary), message=message)
    return Completed(message=f"Every requested arm completed. {report}", data=summary)
