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


def test_hosted_comparison_prices_the_run_tokens_at_each_reference():
    from pipelines.account import hosted_comparison
    from pipelines.config.prices import HostedPrice

    hosted = {
        "batch-api": HostedPrice(description="A batch API", input_per_1m=0.075, output_per_1m=0.30,
                                 source="s", taken=dt.date(2026, 7, 5)),
        "with-cache": HostedPrice(description="Cached input at a discount", input_per_1m=1.0,
                                  cached_input_per_1m=0.25, output_per_1m=4.0, source="s", taken=dt.date(2026, 7, 5)),
    }
    totals = {"prompt_tokens": 2_000_000, "cached_prompt_tokens": 500_000, "completion_tokens": 100_000}
    out = hosted_comparison(totals, 0.05, hosted)
    # 2M prompt tokens (no cache rate: all at the input price) + 0.1M output.
    assert out["batch-api"]["cost_usd"] == pytest.approx(2.0 * 0.075 + 0.1 * 0.30)  # 0.18
    assert out["batch-api"]["times_run_cost"] == pytest.approx(0.18 / 0.05)
    # 1.5M uncached at 1.0, 0.5M cached at 0.25, 0.1M output at 4.0.
    assert out["with-cache"]["cost_usd"] == pytest.approx(1.5 + 0.125 + 0.4)
    assert out["with-cache"]["taken"] == "2026-07-05" and out["with-cache"]["description"].startswith("Cached")
    assert hosted_comparison(totals, 0.0, hosted)["batch-api"]["times_run_cost"] is None
