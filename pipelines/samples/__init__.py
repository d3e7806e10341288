"""Synthetic sample datasets for the sample jobs, generated from a seed.

Each generator knows the true answer of every record it makes (`true_*`
columns), so the sample jobs' summaries can report quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_SEED = 20261128


def generators() -> dict[str, tuple[Callable[..., pa.Table], int]]:
    """Each sample dataset's generator and default row count, by name (`tokenmill samples <name>`)."""
    from pipelines.samples.invoices import make_invoices
    from pipelines.samples.reviews import make_reviews
    from pipelines.samples.tickets import make_tickets

    return {"tickets": (make_tickets, 300), "reviews": (make_reviews, 240), "invoices": (make_invoices, 120)}


def write_shards(table: pa.Table, out_dir: Path, shards: int = 4) -> list[Path]:
    """Split `table` into `shards` Parquet files `part-0000N.parquet` under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // shards)
    paths = []
    for k in range(shards):
        path = out_dir / f"part-{k:05d}.parquet"
        pq.write_table(table.slice(k * per, per), path, compression="zstd")
        paths.append(path)
    return paths
