"""A run's data: its train/val/test rows from the shared split, its two classes, and the parts as tensors."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_schemas.plan import PlannedRun, RunPlan
from data_schemas.training import SplitRow
from tasks.ingest.dataset_store import LoadedDataset
from tasks.splits import ensure_splits, recorded_parts, subsample_patients

if TYPE_CHECKING:
    import torch


NEGATIVE_LABEL_NAMES = frozenset(
    {"0", "normal", "negative", "neg", "healthy", "benign", "control", "absent", "no", "false", "none"}
)


@dataclass
class SplitTensors:
    """The three parts as in-memory tensors at the run's image size, plus their split rows."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    rows: dict[str, list[SplitRow]]
    classes: list[str]
    positive_label: str


def _classes(rows: list[SplitRow], positive_label: str | None) -> tuple[list[str], str]:
    """[negative, positive] label names; ValueError unless there are exactly two."""
    labels = sorted({row.label for row in rows})
    if len(labels) != 2:
        raise ValueError(f"training needs exactly two labels; the split has {len(labels)} ({', '.join(labels[:5])}).")
    if positive_label is not None:
        positive = positive_label
    else:  # the label that reads as "negative" is the negative class; otherwise the last in sorted order
        negatives = [label for label in labels if label.strip().lower() in NEGATIVE_LABEL_NAMES]
        positive = labels[1] if negatives == [labels[0]] else labels[0] if negatives == [labels[1]] else labels[-1]
    if positive not in labels:
        raise ValueError(f"positive_label '{positive}' is not one of the dataset's labels ({', '.join(labels)}).")
    negative = labels[0] if labels[1] == positive else labels[1]
    return [negative, positive], positive


def build_split_tensors(
    images: np.ndarray,
    index_of: dict[str, int],
    parts: dict[str, list[SplitRow]],
    size: int,
    positive: str,
    classes: list[str],
) -> SplitTensors:
    """Gather each part's rows (in the split file's pixel-content order) from the array and resize them once."""
    import torch  # here: a run's split and classes (a re-run's completed check) need no torch

    from tasks.training.augment import images_to_tensor

    x, y = {}, {}
    for name, rows in parts.items():
        indices = np.asarray([index_of[row.image_key] for row in rows], dtype=np.int64)
        x[name] = images_to_tensor(images[indices] if len(indices) else images[:0], size)
        y[name] = torch.tensor([1 if row.label == positive else 0 for row in rows], dtype=torch.long)
    return SplitTensors(x=x, y=y, rows=parts, classes=classes, positive_label=positive)


@dataclass
class RunSplit:
    """A run's share of the shared split: its train/val/test rows, its classes ([negative, positive]) and the split
    file they came from, with its SHA-256."""

    parts: dict[str, list[SplitRow]]
    classes: list[str]
    splits_path: Path
    splits_sha256: str


def run_split(plan: RunPlan, planned: PlannedRun, dataset: LoadedDataset, splits_path: Path) -> RunSplit:
    """The run's rows and classes from the shared split (made, or checked against the data)."""
    rows, info = ensure_splits(
        manifest_rows=dataset.manifest,
        images=dataset.images,
        dataset_hash=dataset.card.content_hash,
        splits_path=splits_path,
        settings=plan.split,
    )
    parts = _patient_parts(plan, planned, rows)
    classes, _ = _classes(rows, planned.config.positive_label)
    return RunSplit(parts=parts, classes=classes, splits_path=splits_path, splits_sha256=info.splits_sha256)


def check_training_part_has_both_classes(parts: dict[str, list[SplitRow]], classes: list[str]) -> None:
    """ValueError naming the training part and its class counts when its images are all of one class.

    A model cannot learn to tell two classes apart from one; such a run would otherwise end "completed" with
    nothing to compare. (A validation part with one class is allowed: model selection then falls back to the
    validation loss, tasks.training.loop.update_selection.)
    """
    counts = Counter(row.label for row in parts["train"])
    if sum(1 for label in classes if counts[label]) < 2:
        shown = ", ".join(f"{counts[label]} {label}" for label in classes)
        raise ValueError(
            f"the training part of this run holds images of one class only ({shown} images); it needs both classes: "
            "label more patients of the rarer class, or use a larger train_fraction or another seed."
        )


def _patient_parts(plan: RunPlan, run: PlannedRun, rows: list[SplitRow]) -> dict[str, list[SplitRow]]:
    """The run's train/val/test rows: its outer fold's parts, training patients subsampled for fractions."""
    parts = recorded_parts(rows, run.outer_fold, plan.split)
    parts["train"] = subsample_patients(parts["train"], run.config.train_fraction, plan.seed)
    return parts
