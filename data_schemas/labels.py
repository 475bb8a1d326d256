"""The labels file a user hands to ingest: one key column and a `label` column."""

from __future__ import annotations

from typing import Literal

LabelKeyColumn = Literal["patient_id", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "path"]
LABEL_KEY_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "path",
)
LABEL_COLUMN = "label"
