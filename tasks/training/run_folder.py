"""The run folder of one training run: every file it holds is written (and the checkpoint read) here.

Shared by the network arms and the linear probe. Files and their schemas: data_schemas/training.py. The checkpoint
is one matching pair, save_checkpoint/load_checkpoint: the loop's whole TrainState dataclass is stored field by
field, so a new field of TrainState is saved and restored without touching this module.

Non-finite outputs. A probability that is NaN or infinite is never written (clamping would turn a diverged network
into a completed constant predictor): require_finite raises NonFiniteOutputError, a ValueError, so the training
task is not retried and the run ends "failed" with the epoch and one sentence.
"""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from data_schemas.files import atomic_write_bytes, read_model_json, write_model_json, write_models_csv
from data_schemas.training import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    OVERFITTING_LOSSES_FILE,
    PREDICTIONS_FILE,
    PROBE_DEPTHS_FILE,
    STATUS_FILE,
    TIMING_FILE,
    VAL_PREDICTIONS_FILE,
    EpochMetrics,
    OverfittingLossRow,
    PredictionRow,
    ProbeDepths,
    RunConfig,
    RunSummary,
    SplitRow,
    TimingInfo,
)

if TYPE_CHECKING:  # torch is imported where tensors are saved or loaded: reading a run folder's files needs none
    import torch


CHECKPOINT_FORMAT = 2


class NonFiniteOutputError(ValueError):
    """A network's outputs or loss became NaN or infinite (training diverged): the run fails, nothing is written."""


def require_finite(values: np.ndarray | torch.Tensor | float, what: str, epoch: int | None) -> None:
    """NonFiniteOutputError, one sentence naming `what` and the epoch, unless every value is finite."""
    import torch

    array = (
        values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=float)
    )
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        when = f" in epoch {epoch}" if epoch is not None else ""
        raise NonFiniteOutputError(
            f"{what} became NaN or infinite{when} ({bad} of {array.size} values): training diverged, so this arm is "
            "failed rather than reported as a constant predictor; a lower learning rate (setting lr) may help."
        )


def now() -> str:
    """UTC time stamp of status.json and config.json."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically: readers see the previous file or the whole new one."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def save_checkpoint(
    run_dir: Path,
    *,
    state: Any,
    config_hash: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
) -> None:
    """checkpoint_last.pt: the state dataclass (every field), model, optimizer, scaler and torch RNG, atomically."""
    import torch

    save_torch(Path(run_dir) / CHECKPOINT_FILE, {
        "format": CHECKPOINT_FORMAT, "config_hash": config_hash,
        "state": {field.name: getattr(state, field.name) for field in dataclasses.fields(state)},
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
    })


def load_checkpoint(
    run_dir: Path,
    *,
    state_type: type,
    config_hash: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any = None,
) -> tuple[Any | None, str]:
    """The pair of save_checkpoint: restores model, optimizer, scaler and RNG and returns (state, "") or, when the
    checkpoint is missing, unreadable or of another configuration, (None, why)."""
    import torch

    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None, "no checkpoint"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - written atomically, so only a foreign or damaged file gets here
        return None, f"cannot read {path.name} ({type(error).__name__})"
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("config_hash") != config_hash:
        return None, f"{path.name} belongs to another configuration"
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return state_type(**checkpoint["state"]), ""


def clear_training_files(run_dir: Path) -> None:
    """Remove what a previous, not resumed run left: its checkpoint, best weights and metrics."""
    for name in (CHECKPOINT_FILE, BEST_FILE, METRICS_FILE):
        (Path(run_dir) / name).unlink(missing_ok=True)


def drop_checkpoint(run_dir: Path) -> None:
    """Remove checkpoint_last.pt once the run is completed: a completed run is never resumed, and the checkpoint
    (weights, optimizer moments and the best epoch's weights) is several times the size of best.pt."""
    (Path(run_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)


def write_best(run_dir: Path, *, state_dict: dict[str, torch.Tensor], epoch: int, val_auc: float | None,
               val_loss: float | None, config_hash: str, arm: str, classes: list[str]) -> None:
    """best.pt: the weights of the selected epoch."""
    save_torch(Path(run_dir) / BEST_FILE, {
        "state_dict": state_dict, "epoch": epoch, "val_auc": val_auc, "val_loss": val_loss,
        "config_hash": config_hash, "arm": arm, "classes": classes,
    })


def write_metrics(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.csv, one EpochMetrics row per finished epoch."""
    write_models_csv(Path(run_dir) / METRICS_FILE, [EpochMetrics.model_validate(h) for h in history], EpochMetrics)


def write_predictions(run_dir: Path, *, rows: Sequence[SplitRow], probs: np.ndarray, positive_label: str,
                      validation: bool = False, epoch: int | None = None) -> None:
    """predictions.csv (test part) or val_predictions.csv (validation part): one PredictionRow per image.

    epoch: the epoch whose weights made `probs`, named when they are not finite (NonFiniteOutputError, nothing written).
    """
    require_finite(probs, f"the {'validation' if validation else 'test'} probabilities", epoch)
    predictions = [
        PredictionRow(image_key=row.image_key, patient_key=row.patient_key, label=row.label,
                      target=int(row.label == positive_label), prob_positive=float(min(1.0, max(0.0, p))))
        for row, p in zip(rows, probs)
    ]
    write_models_csv(
        Path(run_dir) / (VAL_PREDICTIONS_FILE if validation else PREDICTIONS_FILE), predictions, PredictionRow
    )


def write_overfitting_losses(run_dir: Path, rows: Sequence[OverfittingLossRow]) -> None:
    """overfitting_losses.csv: per-image training and validation losses at the chosen and the last epoch."""
    write_models_csv(Path(run_dir) / OVERFITTING_LOSSES_FILE, list(rows), OverfittingLossRow)


def write_timing(run_dir: Path, timing: TimingInfo) -> None:
    """timing.json."""
    write_model_json(Path(run_dir) / TIMING_FILE, timing)


def write_probe_depths(run_dir: Path, probes: ProbeDepths) -> None:
    """probe_depths.json (imagenet-linear arms): AUC per depth and the depth chosen on validation."""
    write_model_json(Path(run_dir) / PROBE_DEPTHS_FILE, probes)


def write_config(run_dir: Path, config: RunConfig) -> None:
    """config.json."""
    write_model_json(Path(run_dir) / CONFIG_FILE, config)


def write_status(run_dir: Path, *, arm: str, status: str, reason: str = "", **extra: Any) -> RunSummary:
    """status.json, written last: only "completed" means the outputs are final."""
    summary = RunSummary(arm=arm, status=status, reason=reason, run_dir=str(run_dir), updated_at=now(), **extra)
    write_model_json(Path(run_dir) / STATUS_FILE, summary)
    return summary


def completed_run(run_dir: Path, config_hash: str) -> RunSummary | None:
    """The run's summary when it already completed with this configuration (then it is not trained again)."""
    path = Path(run_dir) / STATUS_FILE
    try:
        previous = read_model_json(path, RunSummary) if path.is_file() else None
    except ValueError:
        return None
    finished = all((Path(run_dir) / name).is_file() for name in (PREDICTIONS_FILE, VAL_PREDICTIONS_FILE))
    if previous is not None and previous.status == "completed" and previous.config_hash == config_hash and finished:
        return previous
    return None
