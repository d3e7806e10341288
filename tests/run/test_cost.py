"""The run's cost: the accelerator bill from the replicas' ledger, its attribution to records, hosted prices."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
from conftest import PRICE, TABLE, token_table

from pipelines.stages.account import account_batch


def test_hosted_comparison_prices_the_run_tokens_at_each_reference():
    from pipelines.config.prices import HostedPrice
    from pipelines.run.cost import hosted_comparison

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


def _ledger(entries):
    from pipelines.run.ledger import EngineStats

    return EngineStats.from_ledger(entries)


def test_accelerator_bill_splits_busy_start_up_and_idle():
    from pipelines.config.prices import AcceleratorPrice
    from pipelines.run.cost import accelerator_bill

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

    from pipelines.config.engine import CostProfile
    from pipelines.run.cost import attribute_accelerator_cost

    weights = CostProfile(accelerator="x", decode_weight=4.0, cached_weight=0.1).model_dump(mode="json")
    files = []
    for k, rows in enumerate([TABLE[:2], TABLE[2:]]):
        t = account_batch(token_table(rows), mode="accelerator_time", price=PRICE.model_dump(mode="json"),
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
