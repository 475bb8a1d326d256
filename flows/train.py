"""`ctcompare train`: train one arm (optionally K folds) on a dataset folder written by `ctcompare ingest`.

The flow is thin: argument checks, then one `train-arm` task per fold (tasks.train; retries=1, a retry resumes from
the last finished epoch). Outputs per run folder are described in data_schemas/training.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow

from data_schemas.cost import ARM_NAMES, ArmName
from data_schemas.training import KNOWN_SETTINGS, PROFILE_NAMES, RunSummary, resolve_train_config
from flows.cli import UsageError


@flow(name="train", log_prints=True)
def train_flow(
    dataset_dir: Path,
    arm: ArmName,
    run_dir: Path,
    profile: str = "cpu",
    overrides: dict[str, str] | None = None,
    weights: Path | None = None,
    folds: int | None = None,
    seed: int = 0,
    resume: bool = False,
    splits: Path | None = None,
    fold: int | None = None,
) -> list[RunSummary]:
    """One arm; with folds=K, K runs in RUN_DIR/fold-<k> (fold k validates, the others train; test is shared).

    fold=k with folds=K trains that fold alone into RUN_DIR: how a comparison hands its folds to a work pool.
    """
    from tasks.train import train_arm_task

    if fold is not None:
        if folds is not None and not 0 <= fold < folds:
            raise ValueError(f"fold must be between 0 and {folds - 1} for {folds} folds, got {fold}.")
        return [train_arm_task(dataset_dir, arm, run_dir, profile, overrides, weights, seed, resume, splits, fold, folds)]
    if folds is None:
        return [
            train_arm_task(dataset_dir, arm, run_dir, profile, overrides, weights, seed, resume, splits, None, None)
        ]
    summaries = []
    for fold in range(folds):
        summaries.append(
            train_arm_task(
                dataset_dir, arm, Path(run_dir) / f"fold-{fold}", profile, overrides, weights, seed, resume,
                splits, fold, folds,
            )
        )
    return summaries


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs -> dict; UsageError for a malformed pair or an unknown key."""
    overrides: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got '{pair}'.")
        if key not in KNOWN_SETTINGS:
            raise UsageError(f"unknown setting '{key}' in --set; known settings: {', '.join(KNOWN_SETTINGS)}.")
        overrides[key] = value.strip()
    return overrides


def _handler(args: argparse.Namespace) -> int:
    dataset_dir = Path(args.dataset_dir)
    if not (dataset_dir / "dataset.json").is_file():
        raise UsageError(f"{dataset_dir} is not a ctcompare dataset (no dataset.json); run 'ctcompare ingest' first.")
    if args.weights is not None and not Path(args.weights).is_file():
        raise UsageError(f"--weights {args.weights} does not exist.")
    if args.folds is not None and args.folds < 2:
        raise UsageError("--folds must be at least 2.")
    overrides = parse_overrides(args.set)
    try:
        resolve_train_config(args.profile, args.arm, overrides)
    except ValueError as error:
        raise UsageError(str(error).rstrip(".") + ".") from None
    try:
        summaries = train_flow(
            dataset_dir=dataset_dir, arm=args.arm, run_dir=Path(args.out), profile=args.profile, overrides=overrides,
            weights=Path(args.weights) if args.weights else None, folds=args.folds, seed=args.seed,
            resume=args.resume, splits=Path(args.splits) if args.splits else None,
        )
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
    parser = subparsers.add_parser(
        "train",
        help="train one arm (scratch, imagenet, imagenet-linear) on an ingested dataset",
        description="Train one arm on DATASET_DIR (written by 'ctcompare ingest') into RUN_DIR. The patient-level "
        "split is shared: by default RUN_DIR/../splits.csv, reused when it matches the dataset and seed.",
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR")
    parser.add_argument("--arm", required=True, choices=ARM_NAMES)
    parser.add_argument("--out", required=True, metavar="RUN_DIR")
    parser.add_argument("--profile", default="cpu", choices=PROFILE_NAMES, help="settings profile (default: cpu)")
    parser.add_argument("--weights", metavar="PATH", help="local torchvision-format ResNet-50 state dict")
    parser.add_argument("--folds", type=int, metavar="K", help="K-fold cross-validation on the non-test patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the last finished epoch")
    parser.add_argument("--splits", metavar="PATH", help="split file to use or create (default: beside RUN_DIR)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one profile setting, e.g. --set epochs=3"
    )
    parser.set_defaults(handler=_handler)
