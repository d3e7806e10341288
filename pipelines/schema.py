"""The result columns every run writes, in order, with their Arrow types.

Passthrough and truth columns from the input come right after the id, then the
task's typed columns (`label`, or one per extracted field), then these.
"""

from __future__ import annotations

import enum
from typing import Any

import pyarrow as pa


class Reason(enum.StrEnum):
    """Why a record has no answer, or a failed one: the `error_code` of a result, the `reason` of a reject.

    The message beside it (`error`, `message`) names the field, column, line or cause; no code is ever
    parsed out of a message.
    """

    NULL_ID = "null_id"  # the id column is null
    DUPLICATE_ID = "duplicate_id"  # the id was seen before (`input.duplicate_ids`)
    EMPTY_INPUT = "empty_input"  # a prompt column is null, empty or blank
    INVALID_UTF8 = "invalid_utf8"  # a text column holds bytes that are not UTF-8
    PROMPT_TOO_LONG = "prompt_too_long"  # the rendered prompt leaves no room for max_tokens
    IMAGE = "image"  # the image is missing, unreadable or not an image
    ENGINE = "engine"  # the engine refused or aborted this request
    PARSE = "parse"  # the answer is not a label, not JSON, or does not validate
    # Not sent: the run's budget was spent. Never written: the record's shard is left for a resume.
    BUDGET = "budget"
    UNREADABLE = "unreadable"  # a whole shard is not readable Parquet
    SCHEMA = "schema"  # a whole shard lacks a column or holds one of another type
    # OpenAI batch request lines (`pipelines.io.openai_batch`), named as OpenAI's own batch errors are:
    INVALID_JSON = "invalid_json"
    INVALID_URL = "invalid_url"
    INVALID_REQUEST = "invalid_request"
    INVALID_ENCODING = "invalid_encoding"
    DUPLICATE_CUSTOM_ID = "duplicate_custom_id"
    LINE_TOO_LONG = "line_too_long"  # longer than `pipelines.io.openai_batch.MAX_LINE_BYTES`

RESULT_FIELDS: list[pa.Field] = [
    pa.field("output_text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("cached_prompt_tokens", pa.int64()),
    pa.field("cached", pa.bool_()),  # answered from the response cache: no engine work, no cost
    pa.field("work_units", pa.float64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("compute_usd", pa.float64()),
    pa.field("overhead_usd", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("generated_at", pa.timestamp("us", tz="UTC")),
    pa.field("error_code", pa.string()),  # a `Reason`, null on success
    pa.field("error", pa.string()),  # what failed, null on success
]

TOKEN_ID_FIELDS: list[pa.Field] = [
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("output_token_ids", pa.list_(pa.int32())),
]

RESERVED_NAMES = frozenset(f.name for f in RESULT_FIELDS + TOKEN_ID_FIELDS)

CLASSIFY_FIELDS: list[pa.Field] = [pa.field("label", pa.string())]
LABEL_PROBABILITY_FIELD = pa.field("label_probability", pa.float64())


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/X`, as pydantic writes nested models)."""
    seen = 0
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"$ref {ref!r}: only references inside the schema are supported")
        target: Any = root
        for part in ref[2:].split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        seen += 1
        if seen > 32:
            raise ValueError(f"$ref {ref!r}: recursive schemas cannot be a column type")
    return node


def json_schema_arrow_type(node: dict[str, Any], root: dict[str, Any]) -> pa.DataType:
    """The Arrow type a JSON Schema node's values are stored as.

    string -> string (`format: date` -> date32, `format: date-time` -> timestamp UTC),
    integer -> int64, number -> float64, boolean -> bool, object with properties ->
    struct, array -> list; an optional value (`anyOf` with null) is its type, nullable.
    Anything without one Arrow type (mixed unions, free-form objects) is kept as JSON text.
    """
    node = _resolve(node, root)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [_resolve(o, root) for o in node[key]]
            options = [o for o in options if o.get("type") != "null"]
            if len(options) == 1:
                return json_schema_arrow_type(options[0], root)
            return pa.string()
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is None and "enum" in node:
        enum_types = {type(v) for v in node["enum"] if v is not None}
        kind = "string" if enum_types == {str} else None
    if kind is None and "const" in node and isinstance(node["const"], str):
        kind = "string"
    if kind == "string":
        fmt = node.get("format")
        if fmt == "date":
            return pa.date32()
        if fmt == "date-time":
            return pa.timestamp("us", tz="UTC")
        return pa.string()
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "object" and node.get("properties"):
        return pa.struct([
            pa.field(name, json_schema_arrow_type(sub, root))
            for name, sub in node["properties"].items()
        ])
    if kind == "array" and isinstance(node.get("items"), dict):
        return pa.list_(json_schema_arrow_type(node["items"], root))
    return pa.string()


def task_fields(task: str, classify=None, extract=None) -> list[pa.Field]:
    """The typed result columns a task adds before `output_text` (none for `generate`)."""
    if task == "classify":
        return CLASSIFY_FIELDS + ([LABEL_PROBABILITY_FIELD] if classify.probability else [])
    if task == "extract":
        schema = extract.schema_dict
        return [pa.field(name, json_schema_arrow_type(node, schema))
                for name, node in schema["properties"].items()]
    return []


# OpenAI batch requests, checked and staged as Parquet (`pipelines.io.openai_batch`): the input a run reads.
STAGED_SCHEMA = pa.schema([
    ("custom_id", pa.string()),
    ("source", pa.string()),
    ("line", pa.int64()),
    ("messages", pa.string()),  # JSON: [{role, content}] with text content
    ("request_params", pa.string()),  # JSON: sampling overrides and `structured` (response_format)
    ("max_tokens", pa.int64()),
    ("reject_code", pa.string()),  # a `Reason`, for a line that cannot be served
    ("reject", pa.string()),  # why not
])
STAGED_COLUMNS = tuple(STAGED_SCHEMA.names)
