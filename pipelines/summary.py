"""The run summary, computed from the written results so that it always agrees with them."""

from __future__ import annotations

import polars as pl

from pipelines.storage import StorageOptions, protocol_of


def scan_results(uris: list[str], storage: StorageOptions) -> pl.LazyFrame:
    """The results as a lazy polars frame, local or in object storage."""
    opts = storage.polars_kwargs(protocol_of(uris[0])) if uris else {}
    return pl.scan_parquet(uris, storage_options=opts or None)


def result_totals(results: pl.LazyFrame, id_column: str) -> dict:
    """Counts, token totals and cost of a run's results."""
    row = (
        results.select(
            pl.len().alias("records_out"),
            pl.col("error").is_null().sum().alias("records_ok"),
            pl.col("error").is_not_null().sum().alias("records_failed"),
            pl.col(id_column).n_unique().alias("distinct_ids"),
            pl.col("prompt_tokens").fill_null(0).sum().alias("prompt_tokens"),
            pl.col("completion_tokens").fill_null(0).sum().alias("completion_tokens"),
            pl.col("cached_prompt_tokens").fill_null(0).sum().alias("cached_prompt_tokens"),
            pl.col("cost_usd").sum().alias("cost_usd"),
        )
        .collect()
        .row(0, named=True)
    )
    errors = (
        results.filter(pl.col("error").is_not_null())
        .group_by(pl.col("error").str.split(":").list.first().alias("kind"))
        .len()
        .sort("len", descending=True)
        .collect()
    )
    row["errors_by_kind"] = {r["kind"]: r["len"] for r in errors.iter_rows(named=True)}
    return row
