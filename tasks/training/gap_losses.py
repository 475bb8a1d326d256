"""What the overfitting gap needs from a run: each image's plain cross-entropy at the chosen and the last epoch.

The gap of an epoch is the mean validation loss minus the mean training loss, both plain cross-entropy in eval
mode (no label smoothing, class weights or augmentation), on the validation part and on the fixed training
subsample behind EpochMetrics.train_eval_loss. Written per image with its patient (overfitting_losses.csv), so
that the evaluation can bootstrap the gap by patient; the chosen epoch alone biases the gap towards zero, since
model selection picks the epoch with the lowest validation loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from data_schemas.training import OverfittingLossRow, SplitRow
from tasks.common.runtime import Runtime
from tasks.training.loop import FitData, predict_probs


def image_log_losses(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's plain binary cross-entropy from its positive-class probability."""
    eps = 1e-7
    return -(targets * np.log(probs + eps) + (1 - targets) * np.log(1 - probs + eps))


def _image_losses(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, batch_size: int
) -> np.ndarray:
    """Each image's plain cross-entropy in eval mode (the terms whose mean is loop.plain_loss)."""
    if not len(y):
        return np.zeros(0)
    _, logits = predict_probs(model, x, runtime, batch_size)
    return F.cross_entropy(logits, y.cpu(), reduction="none").numpy()


def network_losses(
    model: torch.nn.Module,
    *,
    rows: dict[str, list[SplitRow]],
    subsample: torch.Tensor,
    data: FitData,
    runtime: Runtime,
    batch_size: int,
    epoch: int,
    role: str,
) -> list[OverfittingLossRow]:
    """The live weights' per-image losses on the train_eval subsample (rows["train"][subsample]) and the validation
    part."""
    parts = (
        ("train", [rows["train"][i] for i in subsample.tolist()], data.x_train_eval, data.y_train_eval),
        ("val", rows["val"], data.x_val, data.y_val),
    )
    return [
        OverfittingLossRow(epoch=epoch, role=role, part=part, patient_key=row.patient_key, loss=float(loss))
        for part, part_rows, x, y in parts
        for row, loss in zip(part_rows, _image_losses(model, x, y, runtime, batch_size))
    ]


def probe_losses(
    rows: dict[str, list[SplitRow]], targets: dict[str, np.ndarray], probs: dict[str, np.ndarray]
) -> list[OverfittingLossRow]:
    """A linear probe's per-image losses on every training and validation image; its one epoch is chosen and last."""
    return [
        OverfittingLossRow(epoch=1, role=role, part=part, patient_key=row.patient_key, loss=float(loss))
        for role in ("chosen", "last")
        for part in ("train", "val")
        for row, loss in zip(rows[part], image_log_losses(targets[part], probs[part]))
    ]
