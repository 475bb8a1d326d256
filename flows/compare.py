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

import shlex
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.states import Cancelled, Completed, Failed, State

from data_schemas.arms import ArmName
from data_schemas.plan import RunEnvironment, RunPlan, build_run_plan
from data_schemas.report import ComparisonResults
from flows.compare_stages import ComparisonProgress, estimate_cost, plan_with_split, report_results, train_all
from flows.heartbeats import no_heartbeats
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
from flows.report_folder import check_compare_paths, dataset_folder, report_write_lock
from flows.run_logs import refused, send_run_logs_now, tidy_run_logs
from flows.serve import BASE_URL_ENV, report_url
from reports.render import metrics_table, summary_markdown

DEFAULT_ARMS: list[ArmName] = ["scratch", "imagenet", "imagenet-linear"]
SUMMARY_KEY, METRICS_KEY, LINK_KEY = "ctcompare-summary", "ctcompare-metrics", "ctcompare-report-link"
PARTIAL_STATE_NAME = "Partial"
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
    tidy_run_logs(ComparisonNotComplete)
    ingest_size = _ingest_size(ingest_size, image_size)
    environment = run_environment(weights)
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
        plan, plan_path, n_train = plan_with_split(plan, dataset_dir=dataset_dir, report_dir=report_dir)
        stages = ComparisonProgress(len(plan.runs), report_dir)
        estimate_cost(plan, environment, n_train, report_dir=report_dir, calibrate=calibrate, stages=stages)
        train_all(plan=plan, environment=environment, plan_path=plan_path, dataset_dir=dataset_dir,
                  parallel_arms=parallel_arms, train_deployment=train_deployment, stages=stages)
        command = rerun_command(source=source, out_dir=out_dir, labels=labels, plan=plan, environment=environment,
                                settings=settings, folds=folds, fractions=fractions)
        results, html = report_results(plan=plan, environment=environment, report_dir=report_dir,
                                       dataset_dir=dataset_dir, run_id=run_id, command=command, stages=stages)
        return announce_outcome(results, html=html, report_dir=report_dir, stages=stages)


def announce_outcome(results: ComparisonResults, *, html: Path, report_dir: Path, stages: ComparisonProgress) -> State:
    """The Prefect artifacts, the recommendation and the report's address as the last log lines, and the
    comparison's final state (a Completed state's data is the summary dict, which a direct call returns; any other
    state's data is a ComparisonNotComplete holding it, which a direct call raises)."""
    logger = get_run_logger()
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



def run_environment(weights: str | None) -> RunEnvironment:
    """What a comparison runs with besides its plan: the weights file (resolved) and when the command started."""
    return RunEnvironment(weights=Path(weights).resolve() if weights else None,
                          started_at=command_started_at() or time.time())


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
    with no_heartbeats():  # a subflow: the calling run has the heartbeat
        ingest_flow(src_dir=str(src), out_dir=str(dataset_dir), labels=labels, size=size)
    return dataset_dir


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
