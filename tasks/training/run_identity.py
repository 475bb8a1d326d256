"""What a run is, decided without torch: its config.json (RunConfig) and config_hash, which a completed run folder
must match to be kept (tasks.training.run_folder.completed_run), and the run's log.

A re-run that finds every run completed imports this, never the training modules: the same decision as the training
stage makes, from the same inputs (plan, dataset, split, weights file's SHA-256, runtime).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from data_schemas.files import sha256_json
from data_schemas.plan import PlannedRun, RunPlan
from data_schemas.training import RunConfig, TrainConfig, WeightsInfo
from tasks.common.environment import package_version
from tasks.common.runtime import Runtime, RuntimeChoice
from tasks.splits import count_patient_overlap
from tasks.training.run_folder import now

if TYPE_CHECKING:
    from tasks.ingest.dataset_store import LoadedDataset
    from tasks.training.split_data import RunSplit

EMA_ALPHA = 0.5  # val_auc_ema: weight of the newest epoch's AUC
_stdlib_log = logging.getLogger("ctcompare.train")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task, else the stdlib logger."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return _stdlib_log


def describe_selection(config: TrainConfig) -> str:
    """config.json's record of how the best epoch was chosen and why (see the module doc)."""
    if config.early_stopping_monitor == "val_auc_ema":
        what = (f"validation AUC smoothed by an exponential moving average (weight {EMA_ALPHA} on the newest epoch), "
                "so one noisy epoch cannot win")
    else:
        what = ("plain cross-entropy on the validation part (no smoothing, no class weights): it moves smoothly on a "
                "small validation set, where AUC jumps with one patient")
    stop = ("no early stopping" if config.early_stopping_patience is None else
            f"stop after {config.early_stopping_patience} epochs without improvement, not before epoch "
            f"{min(config.min_epochs, config.epochs)}")
    return f"best epoch by {config.early_stopping_monitor}: {what}; {stop}; the test part is never used"


def _config_identity(config: RunConfig) -> dict[str, Any]:
    """What makes two runs the same run (paths, names, thread counts and times excluded)."""
    data = config.model_dump(mode="json")
    for key in (
        "overrides",
        "profile",
        "splits_path",
        "num_threads",
        "config_hash",
        "created_at",
        "torch_version",
        "torchvision_version",
    ):
        data.pop(key, None)
    if data.get("weights"):
        data["weights"] = {"sha256": data["weights"]["sha256"]}
    return data

def make_run_config(
    plan: RunPlan,
    run: PlannedRun,
    *,
    dataset: LoadedDataset,
    split: RunSplit,
    weights: WeightsInfo | None,
    runtime: Runtime | RuntimeChoice,
) -> RunConfig:
    """config.json of the run, with its config_hash (the run's identity). With a RuntimeChoice (no torch objects:
    a completed check) the thread count, which is not part of the identity, is recorded as 0."""
    parts, classes = split.parts, split.classes

    def patients(name: str) -> int:
        return len({r.patient_key for r in parts[name]})

    config = RunConfig(
        arm=run.arm, profile=plan.profile, overrides=plan.overrides, seed=plan.seed, fold=run.outer_fold,
        folds=plan.split.outer_folds, train=run.config, dataset_hash=dataset.card.content_hash,
        dataset_image_size=dataset.card.image_size, splits_path=str(split.splits_path),
        splits_sha256=split.splits_sha256,
        classes=classes, positive_label=classes[1], n_train_images=len(parts["train"]), n_val_images=len(parts["val"]),
        n_test_images=len(parts["test"]), n_train_patients=patients("train"), n_val_patients=patients("val"),
        n_test_patients=patients("test"), patient_overlap=count_patient_overlap([r for p in parts.values() for r in p]),
        model_selection=describe_selection(run.config), weights=weights, device=str(runtime.device),
        precision=runtime.precision, channels_last=runtime.channels_last,
        num_threads=getattr(runtime, "num_threads", 0), torch_version=package_version("torch") or "",
        torchvision_version=package_version("torchvision") or "", config_hash="", created_at=now(),
    )
    return config.model_copy(update={"config_hash": sha256_json(_config_identity(config))})
