"""A run being trained (RunContext: where it writes, what it trains on, with what) and the files every arm writes
from it: config.json's RunConfig with its identity hash, and timing.json."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

from data_schemas.arms import parse_arm
from data_schemas.files import sha256_json
from data_schemas.plan import PlannedRun, RunPlan
from data_schemas.training import RunConfig, RunSummary, TimingInfo, WeightsInfo
from tasks.common.runtime import Runtime
from tasks.ingest.dataset_store import LoadedDataset
from tasks.splits import count_patient_overlap
from tasks.training.loop import describe_selection
from tasks.training.models import forward_flops_per_image
from tasks.training.run_folder import now, write_status, write_timing
from tasks.training.split_data import RunSplit, SplitTensors


@dataclass
class RunContext:
    """One run being trained: where it writes, what it trains on, with what."""

    arm: str
    run_dir: Path
    config: RunConfig
    runtime: Runtime
    data: SplitTensors
    seed: int
    fold: int
    backbone: dict[str, torch.Tensor] | None
    started: float = field(default_factory=time.perf_counter)

    def status(self, status: str, reason: str = "", **extra: Any) -> RunSummary:
        """Write status.json of this run."""
        return write_status(self.run_dir, arm=self.arm, status=status, reason=reason, fold=self.fold,
                            config_hash=self.config.config_hash, **extra)


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


def write_run_timing(ctx: RunContext, *, train_seconds: float, eval_seconds: float, images_seen: int,
                     epochs_run: int, feature_seconds: float | None = None) -> None:
    """timing.json; FLOPs per image from tasks.training.models.forward_flops_per_image (training step = 3 x forward)."""
    flops = forward_flops_per_image(ctx.config.train.image_size, model=parse_arm(ctx.arm).model)
    seconds = feature_seconds if feature_seconds is not None else train_seconds
    ips = images_seen / max(seconds, 1e-9)
    step_flops = flops if feature_seconds is not None else 3 * flops
    write_timing(
        ctx.run_dir,
        TimingInfo(
            wall_seconds=train_seconds + eval_seconds + (feature_seconds or 0.0),
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            feature_seconds=feature_seconds,
            epochs_run=epochs_run,
            train_images_seen=images_seen,
            images_per_second=ips,
            forward_flops_per_image=flops,
            train_flops_per_image=step_flops,
            achieved_flops_per_second=step_flops * ips,
            device=str(ctx.runtime.device),
            precision=ctx.runtime.precision,
        ),
    )


def fmt_metric(value: float | None) -> str:
    """A metric with three decimals, "n/a" when there is none."""
    return f"{value:.3f}" if value is not None else "n/a"


def make_run_config(
    plan: RunPlan,
    run: PlannedRun,
    *,
    dataset: LoadedDataset,
    split: RunSplit,
    weights: WeightsInfo | None,
    runtime: Runtime,
) -> RunConfig:
    """config.json of the run, with its config_hash (the run's identity)."""
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
        precision=runtime.precision, channels_last=runtime.channels_last, num_threads=runtime.num_threads,
        torch_version=torch.__version__, torchvision_version=torchvision.__version__, config_hash="", created_at=now(),
    )
    return config.model_copy(update={"config_hash": sha256_json(_config_identity(config))})
