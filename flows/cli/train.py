"""`ctcompare train`: train one arm on a dataset folder written by `ctcompare ingest`.

The settings are resolved once into a run plan (RUN_DIR/plan.json): one run, or with `--folds K` one run per outer
fold. The train flow (Prefect, torch) is imported once the arguments pass.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_schemas.arms import ARM_MODES, DEFAULT_MODEL, MODEL_NAMES, parse_arm
from data_schemas.plan import build_run_plan, write_plan
from data_schemas.training import PROFILE_NAMES, SPLITS_FILE, RunSummary
from flows.cli.checks import parse_overrides
from flows.cli.errors import EXIT_FAILED, EXIT_OK, UsageError
from flows.parameters import MAX_SEED, Resume, Seed, TrainDataset, TrainWeights, check_weights_loadable, help_for


def _plan_for_cli(args: argparse.Namespace) -> Path:
    """Resolve the command line into RUN_DIR/plan.json (UsageError for a bad setting); returns its path."""
    if args.folds is not None and args.folds < 2:
        raise UsageError("--folds must be at least 2.")
    try:
        plan = build_run_plan(profile=args.profile, arms=[args.arm], seed=args.seed,
                              settings=parse_overrides(args.set), folds=args.folds, layout="single-arm")
    except ValueError as error:
        raise UsageError(str(error).rstrip(".") + ".") from None
    run_dir = Path(args.out).resolve()
    splits_path = Path(args.splits).resolve() if args.splits else run_dir.parent / SPLITS_FILE
    plan = plan.model_copy(update={"splits_file": Path(os.path.relpath(splits_path, run_dir)).as_posix()})
    return write_plan(run_dir, plan)


def check_train_arguments(args: argparse.Namespace) -> None:
    """UsageError (one sentence) for a missing dataset, a missing or unloadable weights file, or a bad arm or seed."""
    dataset_dir = Path(args.dataset_dir)
    if not (dataset_dir / "dataset.json").is_file():
        raise UsageError(f"{dataset_dir} is not a ctcompare dataset (no dataset.json); run 'ctcompare ingest' first.")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights} does not exist.")
    if args.weights_dir is not None and not Path(args.weights_dir).is_dir():
        raise UsageError(f"--weights-dir {args.weights_dir} is not a folder.")
    try:
        model = parse_arm(args.arm).model
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.weights is not None and model != DEFAULT_MODEL:
        raise UsageError(f"--weights is the ResNet-50 weights file; give {model} weights with --weights-dir DIR "
                         f"(a folder holding its torchvision-format file, e.g. {model}-<hash>.pth) or the torch hub "
                         "cache.")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {args.seed}.")
    try:
        check_weights_loadable(args.weights)
        check_weights_dir(args.arm, args.weights_dir)
    except ValueError as error:
        raise UsageError(str(error)) from None


def check_weights_dir(arm: str, weights_dir: str | None) -> None:
    """ValueError (one sentence) unless the file a pretrained arm would take from --weights-dir (the training stage's
    own choice, weights_file_for) loads as that model's weights (its own reader, read_weights_file, unless it passed
    it unchanged: tasks.training.weights_record)."""
    parsed = parse_arm(arm)
    if weights_dir is None or parsed.mode == "scratch":
        return
    from tasks.training.train import weights_file_for
    from tasks.training.weights_check import check_weights_file

    path = weights_file_for(parsed.model, None, Path(weights_dir))
    if path is not None:
        try:
            check_weights_file(path, parsed.model)
        except ValueError as error:
            raise ValueError(f"--weights-dir: {str(error).splitlines()[0].rstrip('.')}.") from None


def _print_summaries(summaries: list[RunSummary]) -> int:
    """One line per trained run; EXIT_FAILED when a run failed (a skipped run is not a failure)."""
    failed = False
    for summary in summaries:
        auc = f"val AUC {summary.best_val_auc:.3f}" if summary.best_val_auc is not None else "val AUC n/a"
        test = f", test AUC {summary.test_auc:.3f}" if summary.test_auc is not None else ""
        if summary.status == "completed":
            print(f"{summary.arm} (fold {summary.fold}): completed, {summary.epochs_run} epochs, {auc}{test} "
                  f"-> {summary.run_dir}")
        else:
            print(f"{summary.arm} (fold {summary.fold}): {summary.status}: {summary.reason}")
            failed = failed or summary.status == "failed"
    return EXIT_FAILED if failed else EXIT_OK


def _run_train(args: argparse.Namespace) -> int:
    """`ctcompare train`: check the arguments, write the plan, run the flow, print one line per run."""
    check_train_arguments(args)
    plan_path = _plan_for_cli(args)
    from flows.train import RunsSkipped, train_flow

    try:
        state = train_flow(dataset_dir=Path(args.dataset_dir), plan_path=plan_path, resume=args.resume,
                           weights_path=Path(args.weights) if args.weights else None,
                           weights_dir=Path(args.weights_dir) if args.weights_dir else None, return_state=True)
        outcome = state.result(raise_on_failure=not state.is_cancelled())
        summaries = outcome.summaries if isinstance(outcome, RunsSkipped) else outcome  # Skipped: every run skipped
    except ValueError as error:  # bad weights file, mismatched split file, bad labels: one sentence
        print(f"ctcompare train: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_FAILED
    return _print_summaries(summaries)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare train`."""
    parser = subparsers.add_parser(
        "train",
        help="train one arm (scratch, imagenet, imagenet-linear; optionally MODEL:MODE) on an ingested dataset",
        description="Train one arm on DATASET_DIR (written by 'ctcompare ingest') into RUN_DIR. The patient-level "
        "split is shared: by default RUN_DIR/../splits.csv, reused when it matches the dataset, seed and settings. "
        "The resolved settings are written to RUN_DIR/plan.json.",
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help=help_for(TrainDataset))
    parser.add_argument("--arm", required=True, metavar="ARM",
                        help=f"MODE or MODEL:MODE; MODE one of {', '.join(ARM_MODES)}, MODEL one of "
                        f"{', '.join(MODEL_NAMES)} (a bare MODE means {DEFAULT_MODEL}), e.g. resnet18:imagenet")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write: config.json, "
                        "metrics.csv per epoch, the best epoch's weights, predictions, status.json")
    parser.add_argument("--profile", default="cpu", choices=PROFILE_NAMES, help="settings profile (default: cpu)")
    parser.add_argument("--weights", metavar="PATH", help=help_for(TrainWeights))
    parser.add_argument("--weights-dir", metavar="DIR", help="folder of torchvision-format weights files named by "
                        "model as torchvision names them (resnet18-f37072fd.pth, mobilenet_v3_large-5c1a4163.pth; "
                        "any '<model>-<hash>.pth'): the other models' ImageNet weights")
    parser.add_argument("--folds", type=int, metavar="K", help="cross-validated: K outer folds partition every "
                        "labelled patient, each fold is the test part of one run (RUN_DIR/fold-<k>); validation is "
                        "carved from the rest")
    parser.add_argument("--seed", type=int, default=0, help=help_for(Seed, 0))
    parser.add_argument("--resume", action="store_true", help=help_for(Resume))
    parser.add_argument("--splits", metavar="PATH", help="split file to use or create (default: beside RUN_DIR)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one profile setting, e.g. --set epochs=3"
    )
    parser.set_defaults(handler=_run_train)
