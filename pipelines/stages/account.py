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

from pipelines.config.engine import CostProfile
from pipelines.config.prices import ModelPrice

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
