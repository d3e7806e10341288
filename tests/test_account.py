"""Per-record cost from token counts and the price book."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from pipelines.account import account_batch
from pipelines.config.prices import ModelPrice

PRICE = ModelPrice(input_per_1m=2.0, cached_input_per_1m=0.5, output_per_1m=8.0, source="test",
                   taken=dt.date(2026, 11, 1))


def test_cost_uses_uncached_cached_and_output_rates():
    batch = pa.table({
        "prompt_tokens": pa.array([1000, 1000, 50, None], pa.int64()),
        "cached_prompt_tokens": pa.array([0, 400, None, None], pa.int64()),
        "completion_tokens": pa.array([100, 100, None, None], pa.int64()),
    })
    out = account_batch(batch, price=PRICE.model_dump(mode="json"), model="m", run_id="r")
    cost = out.column("cost_usd").to_pylist()
    assert cost[0] == pytest.approx((1000 * 2.0 + 100 * 8.0) / 1e6)
    assert cost[1] == pytest.approx((600 * 2.0 + 400 * 0.5 + 100 * 8.0) / 1e6)
    # Never sent to the engine (no completion): nothing to pay.
    assert cost[2] == 0.0 and cost[3] == 0.0
    assert out.column("model").to_pylist() == ["m"] * 4 and out.column("run_id").to_pylist() == ["r"] * 4


def test_cached_rate_defaults_to_input_rate():
    price = PRICE.model_copy(update={"cached_input_per_1m": None})
    batch = pa.table({"prompt_tokens": pa.array([10], pa.int64()), "cached_prompt_tokens": pa.array([10], pa.int64()),
                      "completion_tokens": pa.array([0], pa.int64())})
    out = account_batch(batch, price=price.model_dump(mode="json"), model="m", run_id="r")
    assert out.column("cost_usd")[0].as_py() == pytest.approx(10 * 2.0 / 1e6)
