"""`ctcompare compare SOURCE --out REPORT_DIR`: its parser and argument checks, and how the outcome is reported.

Every argument is checked before Prefect starts: against the compare flow's own signature, by resolving the run plan
(which the flow then receives, so it is resolved once), and the paths and the weights file. Exit codes: 0 when every
requested arm completed, EXIT_PARTIAL when some did not, EXIT_NO_ARM when none did, EXIT_USAGE for a bad argument.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_schemas.arms import ARM_NAMES, MODEL_NAMES
from data_schemas.training import PROFILE_NAMES
from flows.cli.checks import arm_list, comma_numbers, parse_overrides
from flows.cli.errors import EXIT_NO_ARM, EXIT_OK, EXIT_PARTIAL, UsageError
from flows.cli.prefect_api import check_train_deployment
from flows.parameters import (
    Arms,
    Bootstrap,
    CompareLabels,
    CompareSource,
    Folds,
    Fractions,
    ParallelArms,
    Profile,
    ReportFolder,
    Seed,
    TrainDeployment,
    TrainSizes,
    WeightsFile,
    check_flow_parameters,
    check_weights_loadable,
    help_for,
)

if TYPE_CHECKING:
    from prefect.states import State

    from data_schemas.plan import RunPlan

DESCRIPTION = (
    "Train ResNet-50 from scratch and from ImageNet weights on the same patients and report which wins. A DICOM "
    "SOURCE is ingested once, beside REPORT_DIR (never inside it); the report folder holds report.html, report.md, "
    "results.json and the plan, split, cost estimate and runs it was built from."
)
# Flow parameter -> its command-line spelling, for error sentences.
COMPARE_OPTIONS = {"source": "SOURCE", "out_dir": "--out", "bootstrap": "--bootstrap", "settings": "--set"}


def compare_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The compare flow's parameters from the command line, with the run plan resolved from them under "plan";
    checked against the flow's signature, the plan, the paths and the weights file: UsageError (one sentence)
    before Prefect starts."""
    from flows.compare import compare_flow, comparison_plan
    from flows.report_folder import check_compare_paths

    parameters = {
        "source": args.source, "out_dir": args.out, "labels": args.labels, "profile": args.profile,
        "arms": arm_list(args.arms) or list(ARM_NAMES), "weights": args.weights, "seed": args.seed,
        "folds": args.folds, "fractions": comma_numbers(args.fractions, float, "--fractions"),
        "sizes": comma_numbers(args.sizes, int, "--sizes"), "settings": parse_overrides(args.set),
        "bootstrap": args.bootstrap, "calibrate": not args.no_calibrate, "parallel_arms": args.parallel_arms,
        "train_deployment": args.train_deployment,
    }
    try:
        check_flow_parameters(compare_flow, parameters, COMPARE_OPTIONS)
        plan = comparison_plan(**{key: parameters[key] for key in (
            "profile", "arms", "seed", "settings", "folds", "fractions", "sizes", "bootstrap")})
        check_compare_paths(source=Path(args.source).resolve(), report_dir=Path(args.out).resolve(),
                            labels=Path(args.labels) if args.labels else None,
                            weights=Path(args.weights) if args.weights else None)
        check_weights_loadable(args.weights)
        check_source_labels(Path(args.source).resolve(), Path(args.labels) if args.labels else None, plan)
        check_train_deployment(args.train_deployment)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return {**parameters, "arms": plan.arms, "plan": plan}


def check_source_labels(source: Path, labels: Path | None, plan: RunPlan) -> None:
    """ValueError (one sentence) for labels that cannot train: for a DICOM source the labels file itself and against
    the headers (tasks.ingest.labels.check_labels_file); in cross-validated mode, too few labelled patients
    of a class for the folds (a dataset source: from its manifest)."""
    from tasks.ingest.labels import check_folds_per_class, check_labels_file, dataset_patients_per_class

    folds = plan.split.outer_folds if plan.split.mode == "cross-validated" else None
    if (source / "dataset.json").is_file():
        counts = dataset_patients_per_class(source)
        if folds is not None and counts:
            check_folds_per_class(folds, counts)
    elif labels is not None:
        check_labels_file(labels, source, folds=folds)


def report_outcome(state: State) -> int:
    """Print the outcome of a compare flow run; exit code 0 (all arms), EXIT_PARTIAL or EXIT_NO_ARM. The last line
    is the report's address, or for a partial or failed comparison the arms that did not complete and the address."""
    from flows.compare import ComparisonNotComplete, NoArmCompletedError, not_completed

    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, ComparisonNotComplete):
        summary = outcome.summary
        code = EXIT_NO_ARM if isinstance(outcome, NoArmCompletedError) else EXIT_PARTIAL
    elif isinstance(outcome, BaseException):
        raise outcome
    else:
        summary = outcome
        code = EXIT_PARTIAL if not_completed(summary) else EXIT_OK
    print(summary["recommendation"])
    missing = not_completed(summary)
    if not missing:
        print(f"Report: {summary['link']}")
    else:
        what = "Partial result" if code == EXIT_PARTIAL else "No arm completed"
        print(f"{what}: {', '.join(missing)} did not complete; report: {summary['link']}")
    return code


def _run_compare(args: argparse.Namespace) -> int:
    """`ctcompare compare`: refuse bad input before Prefect starts, take the report folder's write lock (a folder
    another comparison is writing is refused in one sentence), run the flow with the checked plan."""
    parameters = compare_parameters(args)
    from flows.compare import compare_flow
    from flows.report_folder import ReportBusyError, report_write_lock

    report_dir = Path(args.out).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = report_write_lock(report_dir)
        lock.acquire()
    except ReportBusyError as error:
        raise UsageError(str(error)) from None
    try:  # the flow takes the same lock again (re-entrant), so a flow run started elsewhere is refused too
        return report_outcome(compare_flow(**parameters, return_state=True))
    finally:
        lock.release()


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare compare`."""
    parser = subparsers.add_parser("compare", help="the whole comparison: ingest, cost, train every arm, report",
                                   description=DESCRIPTION)
    parser.add_argument("source", metavar="SOURCE", help=help_for(CompareSource))
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help=help_for(ReportFolder))
    parser.add_argument("--labels", help=help_for(CompareLabels))
    parser.add_argument("--profile", default="cpu", choices=PROFILE_NAMES, help=help_for(Profile, "cpu"))
    parser.add_argument("--arms", nargs="+", help=help_for(Arms, ", ".join(ARM_NAMES))
                        + f"; MODEL one of {', '.join(MODEL_NAMES)}")
    parser.add_argument("--weights", help=help_for(WeightsFile))
    parser.add_argument("--seed", type=int, default=0, help=help_for(Seed, 0))
    parser.add_argument("--folds", type=int, default=None, metavar="K", help=help_for(Folds))
    parser.add_argument("--fractions", help=help_for(Fractions))
    parser.add_argument("--sizes", help=help_for(TrainSizes))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a profile setting "
                        "(repeatable), e.g. --set epochs=3 --set image_size=112 (the training input size)")
    parser.add_argument("--bootstrap", type=int, default=1000, help=help_for(Bootstrap, 1000))
    parser.add_argument("--no-calibrate", action="store_true",
                        help="skip this machine's speed calibration in the cost stage")
    parser.add_argument("--parallel-arms", type=int, default=1, help=help_for(ParallelArms, 1))
    parser.add_argument("--train-deployment", help=help_for(TrainDeployment))
    parser.set_defaults(handler=_run_compare)
