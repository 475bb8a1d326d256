"""The main job: DICOM folder (or dataset) -> ingest -> cost -> train every arm on one split -> evaluate -> report.

`ctcompare compare SOURCE --out REPORT_DIR` and `ctcompare demo`. REPORT_DIR holds the report (report.html,
report.md, results.json, figures/), the stage files it was built from (cost.json, splits.csv, runs/<arm>/) and,
when SOURCE is a DICOM folder, the dataset; index.html in REPORT_DIR's parent lists every report there.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from data_schemas.cost import ARM_NAMES, ArmName
from data_schemas.report import REPORT_HTML_FILE, ComparisonResults
from data_schemas.training import SPLITS_FILE, load_profiles, resolve_train_config
from flows.cli import UsageError, arm_list
from flows.cost import cost_flow
from flows.ingest import ingest_flow
from flows.train import parse_overrides
from reports.render import metrics_table, render_report, summary_markdown, update_index
from tasks.dataset_store import load_dataset
from tasks.evaluate import build_results
from tasks.splits import SplitsMismatchError, ensure_splits
from tasks.train import train_arm_task

ProfileName = Literal["smoke", "cpu", "full"]
DEFAULT_ARMS: list[ArmName] = ["scratch", "imagenet", "imagenet-linear"]
SUMMARY_KEY, METRICS_KEY, LINK_KEY = "ctcompare-summary", "ctcompare-metrics", "ctcompare-report-link"


@task(name="prepare-split", cache_policy=NO_CACHE)
def prepare_split(dataset_dir: Path, splits_path: Path, seed: int, profile: str, overrides: dict[str, str], folds: int | None) -> int:
    """Make (or reuse) the one patient-level split every arm shares; returns the number of training images."""
    dataset = load_dataset(dataset_dir, in_memory=False)
    config = resolve_train_config(profile, "scratch", overrides)
    try:
        rows, _ = ensure_splits(dataset.manifest, dataset.card.content_hash, splits_path, seed, config.val_fraction, config.test_fraction, folds)
    except SplitsMismatchError as error:
        raise SplitsMismatchError(
            f"{splits_path.parent} holds a comparison made with other data or settings ({error}); "
            "give another output folder, or set new_folder_per_run for a new folder per run."
        ) from None
    return sum(1 for row in rows if row.part == "train")


@task(name="train-on-pool", cache_policy=NO_CACHE, task_run_name="train-on-pool-{label}")
def train_on_pool(deployment: str, label: str, parameters: dict[str, Any]) -> str:
    """One training run as its own flow run of `deployment` on a work pool; waits for it and returns its state."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, parameters=parameters, timeout=None)
    state = flow_run.state
    return state.name if state is not None else "UNKNOWN"


@task(name="evaluate-arms", cache_policy=NO_CACHE)
def evaluate_arms(
    dataset_dir: Path, splits_path: Path, run_dirs: dict[str, Path], cost_path: Path, run_id: str, seed: int, n_bootstrap: int,
    command: str, fold_dirs: dict[str, list[Path]] | None, fraction_dirs: dict[str, dict[float, Path]] | None,
) -> ComparisonResults:
    """Test metrics with patient-level intervals and paired tests, from the arms' validated outputs."""
    return build_results(dataset_dir, splits_path, run_dirs, cost_path, run_id, seed, n_bootstrap, command, fold_dirs, fraction_dirs)


@task(name="render-report", cache_policy=NO_CACHE)
def write_report(results: ComparisonResults, report_dir: Path) -> Path:
    """report.html, report.md, results.json and the index of every report beside this one."""
    paths = render_report(results, report_dir)
    update_index(report_dir.parent)
    return paths["html"]


def check_compare_arguments(source: Path, report_dir: Path, labels: Path | None, weights: Path | None, arms: list[str], profile: str, overrides: dict[str, str]) -> None:
    """Refuse bad arguments with one sentence before any work starts."""
    if not source.exists():
        raise ValueError(f"{source} does not exist; give a DICOM folder or a dataset folder made by 'ctcompare ingest'.")
    if labels is not None and not labels.is_file():
        raise ValueError(f"labels file {labels} does not exist.")
    if weights is not None and not weights.is_file():
        raise ValueError(f"weights file {weights} does not exist.")
    unknown = [arm for arm in arms if arm not in ARM_NAMES]
    if unknown or not arms:
        raise ValueError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARM_NAMES)}.")
    for arm in arms:
        resolve_train_config(profile, arm, overrides)  # raises on an unknown profile or setting
    if report_dir.exists() and not report_dir.is_dir():
        raise ValueError(f"output {report_dir} exists and is not a folder.")


RunKey = tuple[str, int | None, float]  # (arm, fold, fraction of the training patients)


def plan_training_runs(arms: list[str], folds: int | None, fractions: list[float] | None, report_dir: Path) -> dict[RunKey, Path]:
    """Every training run of a comparison and its folder: the main run of an arm is fold 0 on all training
    patients (runs/<arm>/main); folds and fractions add runs beside it."""
    plan: dict[RunKey, Path] = {}
    for arm in arms:
        for fold in range(folds) if folds else [None]:
            plan[(arm, fold, 1.0)] = report_dir / "runs" / arm / ("main" if not fold else f"fold-{fold}")
        for fraction in fractions or []:
            if fraction < 1.0:
                plan[(arm, None, fraction)] = report_dir / "runs" / arm / f"fraction-{fraction:g}"
    return plan


def train_all(
    plan: dict[RunKey, Path], dataset_dir: Path, report_dir: Path, splits_path: Path, profile: str,
    overrides: dict[str, str], weights: str | None, seed: int, folds: int | None, parallel_arms: int,
    train_deployment: str | None,
) -> None:
    """Run every planned training run, in this process or as flow runs of `train_deployment`; failures are
    logged and show up in the report from each run's status.json."""
    logger = get_run_logger()

    def run_overrides(fraction: float) -> dict[str, str]:
        return {**overrides, "train_fraction": str(fraction)} if fraction < 1.0 else overrides

    with ThreadPoolTaskRunner(max_workers=len(plan) if train_deployment else parallel_arms) as runner:
        if train_deployment:
            futures = [
                runner.submit(train_on_pool, {
                    "deployment": train_deployment,
                    "label": run_dir.relative_to(report_dir / "runs").as_posix().replace("/", "-"),
                    "parameters": {
                        "dataset_dir": str(dataset_dir), "arm": arm, "run_dir": str(run_dir), "profile": profile,
                        "overrides": run_overrides(fraction), "weights": weights and str(Path(weights).resolve()),
                        "seed": seed, "resume": True, "splits": str(splits_path), "fold": fold, "folds": folds,
                    },
                })
                for (arm, fold, fraction), run_dir in plan.items()
            ]
        else:
            futures = [
                runner.submit(train_arm_task, {
                    "dataset_dir": dataset_dir, "arm": arm, "run_dir": run_dir, "profile": profile,
                    "overrides": run_overrides(fraction), "weights_path": Path(weights) if weights else None,
                    "seed": seed, "resume": True, "splits_path": splits_path, "fold": fold, "folds": folds,
                })
                for (arm, fold, fraction), run_dir in plan.items()
            ]
        for future in futures:
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                logger.warning("A training run failed: %s", str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__)


@flow(name="compare")
def compare_flow(
    source: str,
    out_dir: str,
    labels: str | None = None,
    profile: ProfileName = "cpu",
    arms: list[ArmName] = DEFAULT_ARMS,
    weights: str | None = None,
    seed: Annotated[int, Field(ge=0)] = 0,
    folds: Annotated[int, Field(ge=2, le=20)] | None = None,
    fractions: list[Annotated[float, Field(gt=0, le=1)]] | None = None,
    settings: dict[str, str] | None = None,
    image_size: Annotated[int, Field(ge=16, le=1024)] = 224,
    bootstrap: Annotated[int, Field(ge=10, le=100_000)] = 1000,
    calibrate: bool = True,
    parallel_arms: Annotated[int, Field(ge=1, le=16)] = 1,
    new_folder_per_run: bool = False,
    train_deployment: str | None = None,
) -> dict[str, Any]:
    """Train ResNet-50 from scratch and from ImageNet weights on the same patients and report which wins.

    new_folder_per_run: write into OUT_DIR/<UTC time> instead of OUT_DIR, so scheduled runs keep every report
    (OUT_DIR/index.html lists them); otherwise a re-run into OUT_DIR reuses the arms already trained there.
    train_deployment: run every training run (arm, fold, fraction) as a flow run of this deployment (e.g.
    "train/arm") so that the work pool's workers, on several machines or GPUs, take them at once; the dataset and
    OUT_DIR must then be at the same path on every worker. Without it, the arms train in this flow run.
    """
    logger = get_run_logger()
    overrides = dict(settings or {})
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    src, report_dir = Path(source).resolve(), Path(out_dir).resolve()
    if new_folder_per_run:
        report_dir = report_dir / run_id
    check_compare_arguments(src, report_dir, Path(labels) if labels else None, Path(weights) if weights else None, list(arms), profile, overrides)
    report_dir.mkdir(parents=True, exist_ok=True)

    if (src / "dataset.json").is_file():
        dataset_dir = src
    else:
        # Beside the report (above the per-run folders with new_folder_per_run): re-runs ingest incrementally.
        dataset_dir = Path(out_dir).resolve() / "dataset"
        ingest_flow(src_dir=str(src), out_dir=str(dataset_dir), labels=labels, size=image_size)

    splits_path = report_dir / SPLITS_FILE
    n_train = prepare_split(dataset_dir, splits_path, seed, profile, overrides, folds)
    # The imagenet arm's settings include the head-only warm-up the cost stage prices separately.
    config = resolve_train_config(profile, "imagenet", overrides)
    cost_flow(
        n_images=n_train, image_size=config.image_size, channels=1, epochs=config.epochs, batch_size=config.batch_size,
        arms=list(arms), head_warmup_epochs=min(config.freeze_epochs, config.epochs), out_dir=report_dir, calibrate=calibrate,
    )

    plan_runs = plan_training_runs(list(arms), folds, fractions, report_dir)
    train_all(plan_runs, dataset_dir, report_dir, splits_path, profile, overrides, weights, seed, folds, parallel_arms, train_deployment)

    main_runs = {arm: plan_runs[(arm, 0 if folds else None, 1.0)] for arm in arms}
    fold_dirs = {arm: [plan_runs[(arm, k, 1.0)] for k in range(folds)] for arm in arms} if folds else None
    fraction_dirs = {arm: {f: plan_runs.get((arm, None, f), main_runs[arm]) for f in fractions} for arm in arms} if fractions else None
    command = f"ctcompare compare --profile {profile} --arms {' '.join(arms)} --seed {seed}" + (f" --folds {folds}" if folds else "")
    command += f" --fractions {','.join(f'{f:g}' for f in fractions)}" if fractions else ""
    results = evaluate_arms(dataset_dir, splits_path, main_runs, report_dir / "cost.json", run_id, seed, bootstrap, command, fold_dirs, fraction_dirs)
    html = write_report(results, report_dir)

    create_markdown_artifact(key=SUMMARY_KEY, markdown=summary_markdown(results), description="Comparison summary and recommendation")
    create_table_artifact(key=METRICS_KEY, table=metrics_table(results), description="Test metrics per arm (95% CI by patient)")
    create_link_artifact(key=LINK_KEY, link=html.as_uri(), link_text="report.html", description="The full comparison report")
    logger.info("Report written: %s", html)
    logger.info("%s", results.recommendation.headline)
    return {"report": str(html), "report_dir": str(report_dir), "recommendation": results.recommendation.headline,
            "arms": {arm.name: arm.status for arm in results.arms}}


def _fractions(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        values = sorted({float(item) for item in text.split(",") if item.strip()})
    except ValueError:
        raise UsageError(f"--fractions takes comma-separated numbers in (0, 1], got {text!r}.") from None
    if not values or values[0] <= 0 or values[-1] > 1:
        raise UsageError(f"--fractions takes comma-separated numbers in (0, 1], got {text!r}.")
    return values


def _run_compare(args: argparse.Namespace) -> int:
    arms = arm_list(args.arms) or list(DEFAULT_ARMS)
    settings = parse_overrides(args.set)
    fractions = _fractions(args.fractions)
    try:
        check_compare_arguments(Path(args.source).resolve(), Path(args.out).resolve(), Path(args.labels) if args.labels else None,
                                Path(args.weights) if args.weights else None, arms, args.profile, settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    summary = compare_flow(
        source=args.source, out_dir=args.out, labels=args.labels, profile=args.profile, arms=arms, weights=args.weights,
        seed=args.seed, folds=args.folds, fractions=fractions, settings=settings, bootstrap=args.bootstrap, calibrate=not args.no_calibrate,
        parallel_arms=args.parallel_arms, train_deployment=args.train_deployment,
    )
    print(f"Report: {summary['report']}")
    print(summary["recommendation"])
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from flows.synth import synth_flow

    root = Path(args.out).resolve()
    cohort = root / "cohort"
    synth_flow(out_dir=str(cohort), patients=args.patients, slices_per_patient=args.slices_per_patient, seed=args.seed)
    dataset = root / "dataset"
    ingest_flow(src_dir=str(cohort / "dicom"), out_dir=str(dataset), labels=str(cohort / "labels.csv"), size=224)
    summary = compare_flow(
        source=str(dataset), out_dir=str(root / "reports" / f"demo-{args.profile}"), profile=args.profile,
        arms=arm_list(args.arms) or list(DEFAULT_ARMS), weights=args.weights, seed=args.seed,
    )
    print(f"Report: {summary['report']}")
    print(f"Index of every report: {root / 'reports' / 'index.html'}")
    print(summary["recommendation"])
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare compare` and `ctcompare demo`."""
    profiles = tuple(load_profiles())
    parser = subparsers.add_parser("compare", help="the whole comparison: ingest, cost, train every arm, report", description=compare_flow.__doc__)
    parser.add_argument("source", help="a DICOM folder (ingested into OUT/dataset) or a dataset folder from 'ctcompare ingest'")
    parser.add_argument("--out", required=True, help="report folder; index.html in its parent lists every report")
    parser.add_argument("--labels", help="labels CSV for a DICOM source (see 'ctcompare ingest --help')")
    parser.add_argument("--profile", default="cpu", choices=profiles)
    parser.add_argument("--arms", nargs="+", help=f"arms to train (default all): {', '.join(ARM_NAMES)}")
    parser.add_argument("--weights", help="ImageNet (or other torchvision-format) ResNet-50 state dict for the pretrained arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=None, help="K-fold cross-validation on the non-test patients")
    parser.add_argument("--fractions", help="data-efficiency curve: train each arm on these shares of the training patients, e.g. 0.1,0.25,0.5,1.0")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile setting (repeatable)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--no-calibrate", action="store_true", help="skip this machine's speed calibration in the cost stage")
    parser.add_argument("--parallel-arms", type=int, default=1, help="arms trained at once (default 1: each arm uses every core)")
    parser.add_argument("--train-deployment", help="run each training run as a flow run of this deployment (e.g. train/arm) on its work pool")
    parser.set_defaults(handler=_run_compare)

    demo = subparsers.add_parser("demo", help="synthetic demo cohort + the whole comparison (cpu profile)")
    demo.add_argument("--out", default="demo", help="demo folder (cohort/, dataset/, reports/); default ./demo")
    demo.add_argument("--profile", default="cpu", choices=profiles)
    demo.add_argument("--arms", nargs="+", help=f"arms (default all): {', '.join(ARM_NAMES)}")
    demo.add_argument("--weights", help="ImageNet ResNet-50 weights file; without it the pretrained arms are skipped offline")
    demo.add_argument("--patients", type=int, default=150)
    demo.add_argument("--slices-per-patient", type=int, default=10)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_run_demo)
