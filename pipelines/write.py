"""Write: the result columns in their fixed order, as Parquet, and the run summary."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines.schema import RESULT_FIELDS, TOKEN_ID_FIELDS


def result_schema(input_schema: pa.Schema, id_column: str, carried: list[str], token_ids: bool,
                  task_fields: list[pa.Field] = ()) -> pa.Schema:
    """The results' columns: the id, the carried input columns, the task's typed columns, then `RESULT_FIELDS`."""
    fields = [input_schema.field(id_column), *(input_schema.field(c) for c in carried), *task_fields, *RESULT_FIELDS]
    return pa.schema(fields + (TOKEN_ID_FIELDS if token_ids else []))


def select_batch(batch: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """Keep and order the result columns; one row out per row in."""
    return batch.select(schema.names).cast(schema)


def write_json(fs, path: str, payload: dict[str, Any]) -> None:
    with fs.open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
