"""A run being trained (RunContext: where it writes, what it trains on, with what) and timing.json, which every arm
writes from it. config.json's RunConfig and its identity hash are made in tasks.training.run_identity."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from data_schemas.arms import parse_arm
from data_schemas.training import RunConfig, RunSummary, TimingInfo
from tasks.common.runtime import Runtime
from tasks.training.models import forward_flops_per_image
from tasks.training.run_folder import write_status, write_timing
from tasks.training.split_data import SplitTensors


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
