"""The run's cost: the accelerator bill from the replicas' ledger, its attribution to records, the cost lines
of the summary, and what the same tokens would have cost at hosted prices. Per-record token prices and work
units are the account stage's (`pipelines.stages.account`)."""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config.load import Job
from pipelines.config.prices import AcceleratorPrice, HostedPrice
from pipelines.io.storage import replace_file
from pipelines.run.ledger import EngineStats
from pipelines.stages.account import tokens_cost

log = logging.getLogger(__name__)


def accelerator_bill(engine: EngineStats, rate: AcceleratorPrice, units: float) -> dict:
    """The run's accelerator cost from its replicas' ledger, split into busy, start-up and idle time."""
    per_s = rate.usd_per_hour * units / 3600
    startup_s = sum(engine.engine_start_s)
    total = engine.replica_s * per_s
    compute = engine.busy_s * per_s
    startup = min(startup_s * per_s, total - compute)
    return {
        "replicas": engine.replicas,
        "replica_hours": engine.replica_s / 3600,
        "busy_hours": engine.busy_s / 3600,
        "total_usd": total,
        "compute_usd": compute,
        "startup_usd": startup,
        "idle_usd": total - compute - startup,
        "overhead_usd": total - compute,
    }


def attribute_accelerator_cost(fs, files: list[str], *, compute_usd: float, overhead_usd: float,
                               compression: str | None) -> dict:
    """Fill in each result's `compute_usd` (its share of work), `overhead_usd` (an equal share of start-up and
    idle time) and `cost_usd` (their sum), rewriting each results file whole.

    Files are replaced one at a time (a rename locally, one PUT in object
    storage); a run interrupted here is finished by the next attempt, which
    recomputes the same figures from the same ledger.
    """
    total_work = 0.0
    records = all_records = 0
    for path in files:
        t = pq.read_table(fs.open(path, "rb"), columns=["work_units", "cached"])
        total_work += pc.sum(t.column("work_units")).as_py() or 0.0
        records += t.num_rows - (pc.sum(pc.fill_null(t.column("cached"), False)).as_py() or 0)
        all_records += t.num_rows
    if not all_records:
        return {"records": 0, "work_units": 0.0, "unattributed_usd": compute_usd + overhead_usd}
    # Answers from the response cache carry no share, unless the cache answered every record: then the
    # replicas' (short, engine-less) time is theirs to carry, evenly.
    everyone = records == 0
    records = records or all_records
    per_record_overhead = overhead_usd / records
    for path in files:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        work = table.column("work_units")
        # Answers from the response cache took no engine time: no share of it.
        engine_rows = (pa.array([True] * table.num_rows) if everyone
                       else pc.invert(pc.fill_null(table.column("cached"), False)))
        compute = (pc.multiply(work, compute_usd / total_work) if total_work
                   else pc.if_else(engine_rows, compute_usd / records, 0.0))
        overhead = pc.if_else(engine_rows, per_record_overhead, 0.0)
        for name, values in (("compute_usd", compute), ("overhead_usd", overhead),
                             ("cost_usd", pc.add(compute, overhead))):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), values)
        replace_file(fs, path, lambda f, t=table: pq.write_table(t, f, compression=compression))
    return {"records": records, "work_units": total_work, "unattributed_usd": 0.0}


def hosted_comparison(totals: dict, run_cost: float, hosted: dict[str, HostedPrice]) -> dict[str, dict]:
    """What the run's tokens would have cost at each hosted price, and how many times the run's own cost."""
    out: dict[str, dict] = {}
    for name, price in hosted.items():
        cost = tokens_cost(totals["prompt_tokens"], totals["cached_prompt_tokens"], totals["completion_tokens"], price)
        out[name] = {
            "description": price.description,
            "cost_usd": cost,
            "times_run_cost": cost / run_cost if run_cost else None,
            "source": price.source,
            "taken": price.taken.isoformat(),
        }
    return out


def cost_lines(job: Job, totals: dict, engine: EngineStats) -> dict[str, Any]:
    """The run's cost as a finance reader wants it: the mode, the total, its parts, and per 1k records."""
    records = totals["records_out"]
    total = totals["cost_usd"] or 0.0
    lines: dict[str, Any] = {"mode": job.spec.cost.mode, "total_usd": total,
                             "per_1k_records_usd": 1000 * total / records if records else None}
    if job.spec.cost.mode == "per_token":
        # Answers from the response cache cost nothing: only the generated records' tokens are billed.
        p = job.price
        prompt = totals["prompt_tokens"] - totals["cached_records_prompt_tokens"]
        cached = totals["cached_prompt_tokens"] - totals["cached_records_cached_prompt_tokens"]
        output = totals["completion_tokens"] - totals["cached_records_completion_tokens"]
        lines.update(input_usd=tokens_cost(prompt - cached, 0, 0, p),
                     cached_input_usd=tokens_cost(cached, cached, 0, p),
                     output_usd=tokens_cost(0, 0, output, p),
                     rates={"model": job.engine.display_model, **p.model_dump(mode="json")})
        return lines
    rate, weights = job.accelerator_billing()
    bill = accelerator_bill(engine, rate, job.engine.billed_units)
    lines.update(bill, compute_share=bill["compute_usd"] / bill["total_usd"] if bill["total_usd"] else None,
                 work_units=totals.get("work_units"), attributed_usd=total,
                 rates={"accelerator": weights.accelerator, "units_per_replica": job.engine.billed_units,
                        **rate.model_dump(mode="json"), "decode_weight": weights.decode_weight,
                        "cached_weight": weights.cached_weight})
    lines["total_usd"] = bill["total_usd"]
    lines["per_1k_records_usd"] = 1000 * bill["total_usd"] / records if records else None
    return lines


def cache_lines(job: Job, totals: dict, cost: dict[str, Any]) -> dict[str, Any] | None:
    """What the response cache answered and what generating those answers would have cost at this run's
    rates (token prices, or the run's own dollars per unit of engine work)."""
    n = totals["records_cached"]
    if job.spec.cache is None and not n:
        return None
    prompt, cached, output = (totals[f"cached_records_{k}"] for k in ("prompt_tokens", "cached_prompt_tokens",
                                                                       "completion_tokens"))
    if job.spec.cost.mode == "per_token":
        saved = tokens_cost(prompt, cached, output, job.price)
    else:
        _, w = job.accelerator_billing()
        work = (prompt - cached) + w.cached_weight * cached + w.decode_weight * output
        if totals["work_units"]:
            saved = work * cost["compute_usd"] / totals["work_units"]
        elif w.throughput:  # nothing generated: the profile's measured rate
            saved = work / w.throughput.work_per_s * job.usd_per_replica_s()
        else:
            saved = None
    return {"path": job.spec.cache.path if job.spec.cache else None, "records": n,
            "share": n / totals["records_out"] if totals["records_out"] else None,
            "prompt_tokens": prompt, "completion_tokens": output, "saved_usd": saved}
