"""Account: what each record cost.

Two modes (`cost.mode` in the job spec):

- `per_token`: each record at the price book's token prices for the model,
  known as soon as the record is generated.
- `accelerator_time`: the run pays for its replicas' time, from engine start to
  shutdown, at the price book's hourly rate. That total is known only when the
  run ends, so records are written with their `work_units` and their dollars are
  filled in then (`attribute_accelerator_cost`): the replicas' busy time goes to
  records in proportion to their work, and start-up and idle time (the overhead)
  is spread evenly over the records. Either way, the records' `cost_usd` add up
  to the run's total.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config.engine import CostProfile
from pipelines.config.prices import AcceleratorPrice, ModelPrice
from pipelines.observe import EngineStats

log = logging.getLogger(__name__)

NO_WEIGHTS = CostProfile(accelerator="none")  # a profile without a cost section: every token one unit


def _f64(values) -> pa.Array:
    return pc.cast(pc.fill_null(values, 0), pa.float64())


def token_cost(prompt_tokens, cached_tokens, completion_tokens, price: ModelPrice):
    """$ for token counts (arrays or scalars): uncached prompt, cached prompt and output tokens at their rates."""
    cached = _f64(cached_tokens)
    uncached = pc.subtract(_f64(prompt_tokens), cached)
    micro = pc.add(pc.add(pc.multiply(uncached, price.input_per_1m), pc.multiply(cached, price.cached_rate)),
                   pc.multiply(_f64(completion_tokens), price.output_per_1m))
    return pc.divide(micro, 1_000_000.0)


def tokens_cost(prompt_tokens: int, cached_tokens: int, completion_tokens: int, price: ModelPrice) -> float:
    """`token_cost` on totals."""
    return token_cost(pa.scalar(prompt_tokens), pa.scalar(cached_tokens), pa.scalar(completion_tokens),
                      price).as_py()


def work_units(prompt_tokens, cached_tokens, completion_tokens, weights: CostProfile):
    """The engine work a record caused, in uncached prompt tokens: output tokens weigh `decode_weight` each,
    cached prompt tokens `cached_weight`."""
    cached = _f64(cached_tokens)
    uncached = pc.subtract(_f64(prompt_tokens), cached)
    return pc.add(pc.add(uncached, pc.multiply(cached, weights.cached_weight)),
                  pc.multiply(_f64(completion_tokens), weights.decode_weight))


def account_batch(batch: pa.Table, *, mode: str, price: dict, weights: dict | None, model: str,
                  run_id: str) -> pa.Table:
    """Add `work_units`, the cost columns, `model` and `run_id`; one row out per row in.

    A record the engine never processed (no completion count) or answered from
    the response cache (`cached`) costs nothing. In `accelerator_time` mode the
    dollars stay null until the run's time is known.
    """
    prompt, cached, completion = (batch.column(c) for c in ("prompt_tokens", "cached_prompt_tokens",
                                                           "completion_tokens"))
    unprocessed = pc.is_null(completion)
    if "cached" in batch.column_names:
        unprocessed = pc.or_(unprocessed, pc.fill_null(batch.column("cached"), False))
    else:
        batch = batch.append_column("cached", pa.array([False] * batch.num_rows, pa.bool_()))
    work = pc.if_else(unprocessed, 0.0, work_units(prompt, cached, completion,
                                                    CostProfile.model_validate(weights) if weights else NO_WEIGHTS))
    n = batch.num_rows
    if mode == "per_token":
        cost = pc.if_else(unprocessed, 0.0, token_cost(prompt, cached, completion, ModelPrice.model_validate(price)))
        overhead = pa.array([0.0] * n, pa.float64())
    else:
        cost = overhead = pa.nulls(n, pa.float64())
    columns = {"work_units": work, "cost_usd": cost, "compute_usd": cost, "overhead_usd": overhead,
               "model": pa.array([model] * n, pa.string()), "run_id": pa.array([run_id] * n, pa.string())}
    for name, values in columns.items():
        batch = batch.append_column(name, values)
    return batch


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
    from pipelines.commit import replace_file

    total_work = records = all_records = 0
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


def hosted_comparison(totals: dict, run_cost: float, hosted: dict[str, ModelPrice]) -> dict[str, dict]:
    """What the run's tokens would have cost at each hosted price, and how many times the run's own cost."""
    out = {}
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
