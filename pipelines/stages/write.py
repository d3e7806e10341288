"""Write: each batch's rows as Parquet files under their shard's folder, and what was written, for the commit.

Rows the engine generated go to `results/<shard>/`; rows it never generated
(rejected before the engine, failed in it, or the marker of a shard that failed
while being read) go to `rejects/<shard>/` with their reason. Files become part
of the run only when the driver commits their shard (`pipelines.run.commit`); a
file without a committed manifest is debris of an interrupted attempt.
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import RESULT_FIELDS, TOKEN_ID_FIELDS, Reason

REJECT_FIELDS: list[pa.Field] = [
    pa.field("shard", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("reason", pa.string()),
    pa.field("message", pa.string()),
    pa.field("run_id", pa.string()),
]
WRITTEN = pa.schema([
    ("shard", pa.string()),
    ("results_file", pa.string()),
    ("results_rows", pa.int64()),
    ("engine_rows", pa.int64()),  # of the results, those the engine generated (not answered from the cache)
    ("failed_rows", pa.int64()),
    ("rejects_file", pa.string()),
    ("rejects_rows", pa.int64()),
    ("quarantine_code", pa.string()),  # a shard that failed while being read: its `Reason`
    ("quarantine", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("budget_rows", pa.int64()),  # not sent, the budget being spent: not written, so the shard stays uncommitted
    ("sent_rows", pa.int64()),  # rows the engine was asked for (answered, or failed by it), not the cache
])


def result_schema(input_schema: pa.Schema, id_column: str, carried: list[str], token_ids: bool,
                  task_fields: Sequence[pa.Field] = ()) -> pa.Schema:
    """The results' columns: the id, the carried input columns, the task's typed columns, then `RESULT_FIELDS`."""
    fields = [input_schema.field(id_column), *(input_schema.field(c) for c in carried), *task_fields, *RESULT_FIELDS]
    return pa.schema(fields + (TOKEN_ID_FIELDS if token_ids else []))


def reject_schema(input_schema: pa.Schema, id_column: str, carried: list[str]) -> pa.Schema:
    """The rejects' columns: the id, the carried input columns, where the row came from and why it was rejected."""
    return pa.schema([input_schema.field(id_column), *(input_schema.field(c) for c in carried), *REJECT_FIELDS])


def select_batch(batch: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """Keep and order the result columns; one row out per row in."""
    return batch.select(schema.names).cast(schema)


def _rejects(batch: pa.Table, schema: pa.Schema, shard_uris: dict[str, str], run_id: str) -> pa.Table:
    extra = {
        "shard": pa.array([shard_uris.get(k, k) for k in batch.column("_shard").to_pylist()], pa.string()),
        "row": batch.column("_row"),
        "reason": batch.column("error_code"),
        "message": batch.column("error"),
        "run_id": pa.array([run_id] * batch.num_rows, pa.string()),
    }
    for name, values in extra.items():
        batch = batch.append_column(name, values) if name not in batch.column_names else \
            batch.set_column(batch.schema.get_field_index(name), name, values)
    return batch.select(schema.names).cast(schema)


def _write(fs, path: str, table: pa.Table, compression: str | None) -> None:
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression=compression)


def write_batch(batch: pa.Table, *, fs, run_root: str, results: pa.Schema, rejects: pa.Schema,
                shard_uris: dict[str, str], run_id: str, compression: str | None) -> pa.Table:
    """Write a batch's results and rejects, one file each per shard it holds; return one `WRITTEN` row per shard."""
    rows = []
    for key in pc.unique(batch.column("_shard")).to_pylist():
        mine = batch.filter(pc.equal(batch.column("_shard"), key))
        marker = mine.filter(pc.equal(mine.column("_row"), -1))
        mine = mine.filter(pc.not_equal(mine.column("_row"), -1))
        unsent = pc.fill_null(pc.equal(mine.column("error_code"), Reason.BUDGET.value), False)
        budget_rows = pc.sum(unsent).as_py() or 0
        mine = mine.filter(pc.invert(unsent))
        generated = pc.is_valid(mine.column("completion_tokens"))  # the engine produced output
        ok, bad = mine.filter(generated), mine.filter(pc.invert(generated))
        name = uuid.uuid4().hex
        row: dict[str, Any] = {"shard": key, "results_file": None, "results_rows": ok.num_rows,
                               "engine_rows": ok.num_rows - (pc.sum(ok.column("cached")).as_py() or 0),
                               "failed_rows": ok.num_rows - ok.column("error_code").null_count,
                               "rejects_file": None, "rejects_rows": bad.num_rows,
                               "quarantine_code": marker.column("error_code")[0].as_py() if marker.num_rows else None,
                               "quarantine": marker.column("error")[0].as_py() if marker.num_rows else None,
                               "prompt_tokens": pc.sum(ok.column("prompt_tokens")).as_py() or 0,
                               "completion_tokens": pc.sum(ok.column("completion_tokens")).as_py() or 0,
                               "cost_usd": pc.sum(ok.column("cost_usd")).as_py() or 0.0,
                               "budget_rows": budget_rows,
                               "sent_rows": (ok.num_rows - (pc.sum(ok.column("cached")).as_py() or 0)
                                             + (pc.sum(pc.fill_null(pc.equal(bad.column("error_code"),
                                                                             Reason.ENGINE.value), False)).as_py()
                                                or 0))}
        if ok.num_rows:
            row["results_file"] = f"{run_root}/results/{key}/{name}.parquet"
            _write(fs, row["results_file"], select_batch(ok, schema=results), compression)
        if bad.num_rows:
            row["rejects_file"] = f"{run_root}/rejects/{key}/{name}.parquet"
            _write(fs, row["rejects_file"], _rejects(bad, rejects, shard_uris, run_id), compression)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=WRITTEN)
