"""The price book: what a token costs, per model (`conf/prices.yaml`)."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field


class ModelPrice(BaseModel):
    """US dollars per million tokens for one model."""

    model_config = ConfigDict(extra="forbid")

    input_per_1m: float = Field(..., ge=0, description="$ per 1M prompt tokens not served from cache.")
    cached_input_per_1m: float | None = Field(
        None, ge=0, description="$ per 1M prompt tokens served from the prefix cache; default the input price."
    )
    output_per_1m: float = Field(..., ge=0, description="$ per 1M generated tokens.")
    source: str = Field(..., description="Where the figures come from.")
    taken: dt.date = Field(..., description="The date the figures were taken.")

    @property
    def cached_rate(self) -> float:
        return self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m


class HostedPrice(ModelPrice):
    """A hosted API's list price, for comparison: what the run's tokens would have cost there."""

    description: str = Field(..., description="The offering, e.g. `OpenAI Batch API, gpt-4o-mini`.")


class PriceBook(BaseModel):
    """The price book: per-model token prices used for every record's `cost_usd`, and hosted references."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", pattern="^USD$", description="Only US dollars for now.")
    models: dict[str, ModelPrice] = Field(..., description="Prices keyed by the engine profile's `model_name`.")
    hosted: dict[str, HostedPrice] = Field(
        default_factory=dict, description="Dated hosted prices every summary compares the run's tokens against.")
