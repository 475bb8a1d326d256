"""The one base class of every schema: unknown keys are an error, so a misspelt field never passes silently."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that refuses fields it does not declare."""

    model_config = ConfigDict(extra="forbid")
