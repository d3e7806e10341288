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


class AcceleratorPrice(BaseModel):
    """What one accelerator (a GPU, or a CPU core) costs per hour, for `cost.mode: accelerator_time`."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(..., description="The hardware and the offering, e.g. `H100 SXM 80GB, on demand`.")
    usd_per_hour: float = Field(..., gt=0, description="$ per accelerator-hour.")
    source: str = Field(..., description="Where the figure comes from.")
    taken: dt.date = Field(..., description="The date the figure was taken.")


class PriceBook(BaseModel):
    """The price book: per-model token prices, accelerator-hour rates, and hosted references."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", pattern="^USD$", description="Only US dollars for now.")
    models: dict[str, ModelPrice] = Field(
        ..., description="Token prices keyed by the engine profile's `model_name`, for `cost.mode: per_token`.")
    accelerators: dict[str, AcceleratorPrice] = Field(
        default_factory=dict, description="Hourly rates keyed by the engine profile's `cost.accelerator`, for "
        "`cost.mode: accelerator_time`.")
    hosted: dict[str, HostedPrice] = Field(
        default_factory=dict, description="Dated hosted prices every summary compares the run's tokens against.")
