"""Account: what each record cost, from its token counts and the price book."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config.prices import ModelPrice


def cost_usd(prompt_tokens: pa.Array, cached_tokens: pa.Array, completion_tokens: pa.Array, price: ModelPrice):
    """Dollar cost per record: uncached prompt, cached prompt and output tokens at their rates.

    A record the engine never processed (no completion count) costs nothing.
    """
    cached = pc.fill_null(cached_tokens, 0)
    uncached = pc.subtract(pc.fill_null(prompt_tokens, 0), cached)
    micro = pc.add(
        pc.add(pc.multiply(pc.cast(uncached, pa.float64()), price.input_per_1m),
               pc.multiply(pc.cast(cached, pa.float64()), price.cached_rate)),
        pc.multiply(pc.cast(pc.fill_null(completion_tokens, 0), pa.float64()), price.output_per_1m),
    )
    cost = pc.divide(micro, 1_000_000.0)
    return pc.if_else(pc.is_null(completion_tokens), 0.0, cost)


def account_batch(batch: pa.Table, *, price: dict, model: str, run_id: str) -> pa.Table:
    """Add `cost_usd`, `model` and `run_id`; one row out per row in."""
    p = ModelPrice.model_validate(price)
    cost = cost_usd(batch.column("prompt_tokens"), batch.column("cached_prompt_tokens"),
                    batch.column("completion_tokens"), p)
    n = batch.num_rows
    batch = batch.append_column("cost_usd", cost)
    batch = batch.append_column("model", pa.array([model] * n, pa.string()))
    return batch.append_column("run_id", pa.array([run_id] * n, pa.string()))


def tokens_cost(prompt_tokens: int, cached_tokens: int, completion_tokens: int, price: ModelPrice) -> float:
    """Dollar cost of token totals at a price (the same formula as `cost_usd`, on sums)."""
    uncached = prompt_tokens - cached_tokens
    return (uncached * price.input_per_1m + cached_tokens * price.cached_rate
            + completion_tokens * price.output_per_1m) / 1_000_000


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
