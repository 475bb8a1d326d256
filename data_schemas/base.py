"""The one base class of every schema: unknown keys are an error, so a misspelt field never passes silently."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that refuses fields it does not declare and NaN or infinite floats.

    A float that is undefined (an AUC of one class, a loss that diverged) is stored as None, never as NaN, so that
    an `Infinity` typed as a setting is refused where it enters instead of failing later as "Input contains NaN".
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
