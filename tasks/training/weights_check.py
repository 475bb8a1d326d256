"""The check a command makes of a weights file before any work: from the record of its last check while the file is
unchanged (tasks.training.weights_record, no torch), else the full check (tasks.training.weights, which loads it with
torch and records a pass)."""

from __future__ import annotations

from pathlib import Path

from data_schemas.arms import DEFAULT_MODEL
from data_schemas.training import WeightsInfo
from tasks.training.weights_record import recorded_check


def check_weights_file(path: Path, model: str = DEFAULT_MODEL) -> WeightsInfo:
    """The WeightsInfo of a usable weights file of `model`: from the record of its last check while it is unchanged,
    else from the full check (tasks.training.weights.read_weights_file, which records it). Raises WeightsFileError."""
    recorded = recorded_check(path, model)
    if recorded is not None:
        return recorded
    from tasks.training.weights import read_weights_file  # torch and torchvision: only when the file must be read

    return read_weights_file(Path(path), model)[1]
