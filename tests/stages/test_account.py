"""Per-record cost from token counts and the price book, in both cost modes."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import PRICE, token_table

from pipelines.stages.account import account_batch


def test_cost_uses_uncached_cached_and_output_rates():
    batch = pa.table({
        "prompt_tokens": pa.array([1000, 1000, 50, None], pa.int64()),
        "cached_prompt_tokens": pa.array([0, 400, None, None], pa.int64()),
        "completion_tokens": pa.array([100, 100, None, None], pa.int64()),
    })
    out = account_batch(batch, mode="per_token", price=PRICE.model_dump(mode="json"), weights=None, model="m",
                        run_id="r")
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
    out = account_batch(batch, mode="per_token", price=price.model_dump(mode="json"), weights=None, model="m",
                        run_id="r")
    assert out.column("cost_usd")[0].as_py() == pytest.approx(10 * 2.0 / 1e6)


def test_per_token_mode_against_hand_computed_figures():
    out = account_batch(token_table(), mode="per_token", price=PRICE.model_dump(mode="json"), weights=None, model="m",
                        run_id="r")
    # $2 per 1M uncached prompt tokens, $0.50 per 1M cached, $8 per 1M output.
    expected = [
        (1200 * 2.0 + 40 * 8.0) / 1e6,                 # 0.002720
        (176 * 2.0 + 1024 * 0.5 + 40 * 8.0) / 1e6,     # 0.001184
        (44 * 2.0 + 256 * 0.5 + 2 * 8.0) / 1e6,        # 0.000232
        (80 * 2.0 + 500 * 8.0) / 1e6,                  # 0.004160
        (904 * 2.0 + 4096 * 0.5) / 1e6,                # 0.003856
    ]
    assert out.column("cost_usd").to_pylist() == pytest.approx(expected, rel=1e-12)
    assert sum(out.column("cost_usd").to_pylist()) == pytest.approx(0.012152, rel=1e-12)
    # Per-token cost has no overhead: all of it is the record's own.
    assert out.column("compute_usd").to_pylist() == out.column("cost_usd").to_pylist()
    assert out.column("overhead_usd").to_pylist() == [0.0] * 5


def test_work_units_weigh_output_and_cached_tokens():
    from pipelines.config.engine import CostProfile

    weights = CostProfile(accelerator="x", decode_weight=4.0, cached_weight=0.1)
    out = account_batch(token_table(), mode="accelerator_time", price=PRICE.model_dump(mode="json"),
                        weights=weights.model_dump(mode="json"), model="m", run_id="r")
    assert out.column("work_units").to_pylist() == pytest.approx(
        [1200 + 160, 176 + 102.4 + 160, 44 + 25.6 + 8, 80 + 2000, 904 + 409.6])
    # Dollars are known only when the run's accelerator time is.
    assert out.column("cost_usd").null_count == 5
