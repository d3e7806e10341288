"""Per-record cost from token counts and the price book, in both cost modes."""

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


# A fixed table of token counts: (prompt, cached, completion).
TABLE = [(1200, 0, 40), (1200, 1024, 40), (300, 256, 2), (80, 0, 500), (5000, 4096, 0)]


def _table(rows=TABLE) -> pa.Table:
    p, c, o = zip(*rows)
    return pa.table({"prompt_tokens": pa.array(p, pa.int64()), "cached_prompt_tokens": pa.array(c, pa.int64()),
                     "completion_tokens": pa.array(o, pa.int64())})


def test_per_token_mode_against_hand_computed_figures():
    out = account_batch(_table(), mode="per_token", price=PRICE.model_dump(mode="json"), weights=None, model="m",
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
    out = account_batch(_table(), mode="accelerator_time", price=PRICE.model_dump(mode="json"),
                        weights=weights.model_dump(mode="json"), model="m", run_id="r")
    assert out.column("work_units").to_pylist() == pytest.approx(
        [1200 + 160, 176 + 102.4 + 160, 44 + 25.6 + 8, 80 + 2000, 904 + 409.6])
    # Dollars are known only when the run's accelerator time is.
    assert out.column("cost_usd").null_count == 5


def _ledger(entries):
    from pipelines.observe import EngineStats

    return EngineStats.from_ledger(entries)


def test_accelerator_bill_splits_busy_start_up_and_idle():
    from pipelines.account import accelerator_bill
    from pipelines.config.prices import AcceleratorPrice

    rate = AcceleratorPrice(description="GPU", usd_per_hour=3.6, source="s", taken=dt.date(2026, 5, 1))
    # Two replicas: 100 s and 60 s of wall time, 20 s and 15 s of start-up, 70 s and 30 s busy.
    engine = _ledger([
        {"created_at": 1000.0, "stopped_at": 1100.0, "last_seen": 1090.0, "engine_start_s": 20.0, "busy_s": 70.0,
         "rows": 10, "output_tokens": 100, "first_batch_start": 1021.0},
        {"created_at": 1040.0, "stopped_at": None, "last_seen": 1100.0, "engine_start_s": 15.0, "busy_s": 30.0,
         "rows": 5, "output_tokens": 50, "first_batch_start": 1056.0},
    ])
    bill = accelerator_bill(engine, rate, units=2)  # 2 GPUs a replica: $0.002 per replica-second
    assert bill["total_usd"] == pytest.approx(160 * 0.002)
    assert bill["compute_usd"] == pytest.approx(100 * 0.002)
    assert bill["startup_usd"] == pytest.approx(35 * 0.002)
    assert bill["idle_usd"] == pytest.approx(25 * 0.002)
    assert bill["overhead_usd"] == pytest.approx(60 * 0.002)


def test_attribution_adds_up_to_the_total_and_follows_the_work(tmp_path):
    import fsspec
    import pyarrow.parquet as pq

    from pipelines.account import attribute_accelerator_cost
    from pipelines.config.engine import CostProfile

    weights = CostProfile(accelerator="x", decode_weight=4.0, cached_weight=0.1).model_dump(mode="json")
    files = []
    for k, rows in enumerate([TABLE[:2], TABLE[2:]]):
        t = account_batch(_table(rows), mode="accelerator_time", price=PRICE.model_dump(mode="json"),
                          weights=weights, model="m", run_id="r")
        files.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(t, files[-1])
    fs = fsspec.filesystem("file")
    done = attribute_accelerator_cost(fs, files, compute_usd=0.25, overhead_usd=0.05, compression="zstd")
    t = pa.concat_tables([pq.read_table(f) for f in files])
    cost, compute, overhead, work = (t.column(c).to_pylist() for c in
                                     ("cost_usd", "compute_usd", "overhead_usd", "work_units"))
    assert done["records"] == 5 and sum(cost) == pytest.approx(0.30, rel=1e-9)
    assert overhead == pytest.approx([0.01] * 5)  # start-up and idle: an equal share each
    assert compute == pytest.approx([0.25 * w / sum(work) for w in work])
    order = sorted(range(5), key=lambda i: work[i])
    assert [cost[i] for i in order] == sorted(cost)  # more work, more cost
    # Redoing it (a resumed run) gives the same figures.
    attribute_accelerator_cost(fs, files, compute_usd=0.25, overhead_usd=0.05, compression="zstd")
    assert pa.concat_tables([pq.read_table(f) for f in files]).column("cost_usd").to_pylist() == cost
