"""`ctcompare train`: train one arm on a dataset folder written by `ctcompare ingest`.

The CLI resolves the settings once into a run plan (RUN_DIR/plan.json, data_schemas/plan.py): one run, or with
`--folds K` one run per outer fold (RUN_DIR/fold-<k>; every labelled patient is tested in exactly one of them).
The flow is thin: one `train-arm` task per planned run (tasks.training.train; retries=1, a retry resumes from the last
finished epoch). A comparison hands single runs of its own plan to this flow on a work pool (`run=...`).
Outputs per run folder are described in data_schemas/training.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from prefect import flow

from data_schemas.arms import ARM_MODES, LEGACY_MODEL, MODEL_NAMES, parse_arm
from data_schemas.plan import ALL_SETTING_KEYS, build_run_plan, read_plan, write_plan
from data_schemas.training import PROFILE_NAMES, SPLITS_FILE, RunSummary
from flows.cli import UsageError
from flows.parameters import (
    MAX_SEED,
    PlanFile,
    PlannedRunFolder,
    Resume,
    Seed,
    TrainDataset,
    TrainWeights,
    WeightsFolder,
    check_weights_loadable,
    help_for,
)


@flow(name="train", log_prints=True)
def train_flow(
    *,
    dataset_dir: TrainDataset,
    plan_path: PlanFile,
    run: PlannedRunFolder = None,
    weights_path: TrainWeights = None,
    resume: Resume = False,
    weights_dir: WeightsFolder = None,
) -> list[RunSummary]:
    """Train the runs of a plan: every run, or only `run` (its folder as written in the plan).

    run=... is how a comparison hands one training run to a work pool. weights_path: the ResNet-50 weights file;
    weights_dir: a folder of torchvision-format weights files named by model (e.g. resnet18-f37072fd.pth).
    """
    from tasks.training.train import train_arm_task

    plan = read_plan(Path(plan_path))
    runs = [plan.run(run).run_dir] if run is not None else [planned.run_dir for planned in plan.runs]
    return [
        train_arm_task(dataset_dir=Path(dataset_dir), plan_path=Path(plan_path), run=name, weights_path=weights_path,
                       resume=resume, weights_dir=Path(weights_dir) if weights_dir else None)
        for name in runs
    ]


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict; UsageError for a malformed pair or an unknown key."""
    overrides: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{pair}'.")
        if key not in ALL_SETTING_KEYS:
            raise UsageError(f"unknown setting '{key}' in --set; known settings: {', '.join(ALL_SETTING_KEYS)}.")
        overrides[key] = value.strip()
    return overrides


def _plan_for_cli(args: argparse.Namespace) -> Path:
    """Resolve the command line into RUN_DIR/plan.json (UsageError for a bad setting); returns its path."""
    if args.folds is not None and args.folds < 2:
        raise UsageError("--folds must be at least 2.")
    try:
        plan = build_run_plan(profile=args.profile, arms=[args.arm], seed=args.seed, settings=parse_overrides(args.set),
                              folds=args.folds, layout="single-arm")
    except ValueError as error:
        raise UsageError(str(error).rstrip(".") + ".") from None
    run_dir = Path(args.out).resolve()
    splits_path = Path(args.splits).resolve() if args.splits else run_dir.parent / SPLITS_FILE
    plan = plan.model_copy(update={"splits_file": Path(os.path.relpath(splits_path, run_dir)).as_posix()})
    return write_plan(run_dir, plan)


def _handler(args: argparse.Namespace) -> int:
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
    if args.weights is not None and model != LEGACY_MODEL:
        raise UsageError(f"--weights is the ResNet-50 weights file; give {model} weights with --weights-dir DIR "
                         f"(a folder holding its torchvision-format file, e.g. {model}-<hash>.pth) or the torch hub cache.")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number from 0 to {MAX_SEED}, got {args.seed}.")
    try:
        check_weights_loadable(args.weights)
    except ValueError as error:
        raise UsageError(str(error)) from None
    plan_path = _plan_for_cli(args)
    try:
        summaries = train_flow(dataset_dir=dataset_dir, plan_path=plan_path, resume=args.resume,
                               weights_path=Path(args.weights) if args.weights else None,
                               weights_dir=Path(args.weights_dir) if args.weights_dir else None)
    except ValueError as error:  # bad weights file, mismatched split file, bad labels: one sentence
        print(f"ctcompare train: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    failed = False
    for summary in summaries:
        auc = f"val AUC {summary.best_val_auc:.3f}" if summary.best_val_auc is not None else "val AUC n/a"
        test = f", test AUC {summary.test_auc:.3f}" if summary.test_auc is not None else ""
        if summary.status == "completed":
            print(f"{summary.arm} (fold {summary.fold}): completed, {summary.epochs_run} epochs, {auc}{test} -> {summary.run_dir}")
        else:
            print(f"{summary.arm} (fold {summary.fold}): {summary.status}: {summary.reason}")
            failed = failed or summary.status == "failed"
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ctcompare train`."""
    parser = subparsers.add_parser(
        "train",
        help="train one arm (scratch, imagenet, imagenet-linear; optionally MODEL:MODE) on an ingested dataset",
        description="Train one arm on DATASET_DIR (written by 'ctcompare ingest') into RUN_DIR. The patient-level "
        "split is shared: by default RUN_DIR/../splits.csv, reused when it matches the dataset, seed and settings. "
        "The resolved settings are written to RUN_DIR/plan.json.",
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR")
    parser.add_argument("--arm", required=True, metavar="ARM",
                        help=f"MODE or MODEL:MODE; MODE one of {', '.join(ARM_MODES)}, MODEL one of "
                        f"{', '.join(MODEL_NAMES)} (a bare MODE means {LEGACY_MODEL}), e.g. resnet18:imagenet")
    parser.add_argument("--out", required=True, metavar="RUN_DIR")
    parser.add_argument("--profile", default="cpu", choices=PROFILE_NAMES, help="settings profile (default: cpu)")
    parser.add_argument("--weights", metavar="PATH", help=help_for(TrainWeights))
    parser.add_argument("--weights-dir", metavar="DIR", help="folder of torchvision-format weights files named by "
                        "model as torchvision names them (resnet18-f37072fd.pth, mobilenet_v3_large-5c1a4163.pth; "
                        "any '<model>-<hash>.pth'): the other models' ImageNet weights")
    parser.add_argument("--folds", type=int, metavar="K", help="cross-validated: K outer folds partition every labelled "
                        "patient, each fold is the test part of one run (RUN_DIR/fold-<k>); validation is carved from the rest")
    parser.add_argument("--seed", type=int, default=0, help=help_for(Seed, 0))
    parser.add_argument("--resume", action="store_true", help=help_for(Resume))
    parser.add_argument("--splits", metavar="PATH", help="split file to use or create (default: beside RUN_DIR)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one profile setting, e.g. --set epochs=3"
    )
    parser.set_defaults(handler=_handler)
