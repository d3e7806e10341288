"""Parse: turn the engine's raw output into the record's result.

`generate`: the text is the result; only how the generation ended needs a look
(an aborted request is an error, a length cut-off is not).
`classify`: the text must be one of the labels; it becomes `label` (and
`label_probability`, from the constrained tokens' logprobs, when asked).
`extract`: the text must be JSON that validates against the schema; each
top-level field becomes a typed column. A record that fails keeps its raw
`output_text`, gets null task columns and an `error` that names the field.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.schema import Reason


def _with_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, name, values) if i >= 0 else batch.append_column(name, values)


def _cut_note(finish: str | None) -> str:
    return " (generation was cut at sampling.max_tokens)" if finish == "length" else ""


def parse_labels(texts: list[str | None], finish: list[str | None], errors: list[str | None],
                 labels: list[str]) -> tuple[list[str | None], list[str | None]]:
    """Each output as one of `labels`, or null with an error; returns (labels, errors)."""
    allowed = set(labels)
    out: list[str | None] = [None] * len(texts)
    errors = list(errors)
    for i, text in enumerate(texts):
        if errors[i] is not None or text is None:
            continue
        value = text.strip()
        if value in allowed:
            out[i] = value
        else:
            errors[i] = f"label: {text[:80]!r} is not one of {labels}{_cut_note(finish[i])}"
    return out, errors


def to_arrow_value(value: Any, kind: pa.DataType) -> Any:
    """A validated JSON value in the Python form pyarrow stores as `kind`. Raises ValueError."""
    if value is None:
        return None
    if pa.types.is_date32(kind):
        return dt.date.fromisoformat(value)
    if pa.types.is_timestamp(kind):
        stamp = dt.datetime.fromisoformat(value)
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)).astimezone(dt.timezone.utc)
    if pa.types.is_string(kind):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if pa.types.is_struct(kind):
        return {f.name: to_arrow_value(value.get(f.name), f.type) for f in kind}
    if pa.types.is_list(kind):
        return [to_arrow_value(v, kind.value_type) for v in value]
    if pa.types.is_integer(kind) and isinstance(value, float):
        return int(value)  # 3.0 validates as an integer in JSON Schema
    return value


def _field_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_error(obj: Any, validator) -> str | None:
    """The reason `obj` fails the schema, naming the field(s); None when it validates."""
    found = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not found:
        return None
    reasons = []
    for err in found[:3]:
        path = list(err.absolute_path)
        if err.validator == "required" and isinstance(err.instance, dict):
            missing = [f for f in err.validator_value if f not in err.instance]
            for name in missing:
                reasons.append(f"field {_field_path([*path, name])!r}: required but missing")
            continue
        where = _field_path(path) or "(the object)"
        reasons.append(f"field {where!r}: {err.message[:160]}")
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return "; ".join(reasons) + more


def parse_objects(texts: list[str | None], finish: list[str | None], errors: list[str | None],
                  schema: dict[str, Any], fields: list[pa.Field]) -> tuple[dict[str, list], list[str | None]]:
    """Each output as the schema's object, split into one value list per top-level field; returns (columns, errors)."""
    from jsonschema import Draft202012Validator, FormatChecker

    validator = Draft202012Validator(schema, format_checker=FormatChecker())
    columns: dict[str, list] = {f.name: [None] * len(texts) for f in fields}
    errors = list(errors)
    for i, text in enumerate(texts):
        if errors[i] is not None or text is None:
            continue
        try:
            obj = json.loads(text)
        except ValueError as exc:
            errors[i] = f"output is not valid JSON: {exc}{_cut_note(finish[i])}"
            continue
        reason = validation_error(obj, validator)
        if reason:
            errors[i] = reason
            continue
        values = {}
        for f in fields:
            try:
                values[f.name] = to_arrow_value(obj.get(f.name), f.type)
            except (ValueError, TypeError, AttributeError) as exc:
                reason = f"field {f.name!r}: {obj.get(f.name)!r} is not a {f.type}: {exc}"
                break
        if reason:
            errors[i] = reason
            continue
        for name, value in values.items():
            columns[name][i] = value
    return columns, errors


def parse_batch(batch: pa.Table, *, task: str = "generate", labels: list[str] | None = None,
                schema: dict[str, Any] | None = None, fields: list[pa.Field] | None = None) -> pa.Table:
    """Mark aborted generations as errors and parse the task's columns; one row out per row in.

    Args:
        task: The spec's `task`.
        labels: `classify`: the allowed labels.
        schema: `extract`: the JSON Schema.
        fields: The task's result columns (`pipelines.schema.task_fields`).
    """
    finish_col = batch.column("finish_reason")
    aborted = pc.and_(pc.fill_null(pc.equal(finish_col, "abort"), False), pc.is_null(batch.column("error_code")))
    code_col = pc.if_else(aborted, pa.scalar(Reason.ENGINE.value), batch.column("error_code"))
    error_col = pc.if_else(aborted, pa.scalar("request aborted"), batch.column("error"))
    if task == "generate":
        return _with_column(_with_column(batch, "error_code", code_col), "error", error_col)

    texts = batch.column("output_text").to_pylist()
    finish = finish_col.to_pylist()
    codes = code_col.to_pylist()
    errors = error_col.to_pylist()
    fields = fields or []
    if task == "classify":
        values, errors = parse_labels(texts, finish, errors, labels or [])
        columns: dict[str, list[Any]] = {"label": values}
        if any(f.name == "label_probability" for f in fields):
            logprob = batch.column("output_logprob").to_pylist()
            columns["label_probability"] = [
                None if v is None or lp is None else math.exp(lp) for v, lp in zip(values, logprob)]
    else:
        columns, errors = parse_objects(texts, finish, errors, schema or {}, fields)
    for f in fields:
        batch = _with_column(batch, f.name, pa.array(columns[f.name], f.type))
    # A row that had no error before this stage and has one now failed to parse.
    codes = [c if c is not None or e is None else Reason.PARSE.value for c, e in zip(codes, errors)]
    out = _with_column(_with_column(batch, "error_code", pa.array(codes, pa.string())), "error",
                       pa.array(errors, pa.string()))
    assert out.num_rows == len(texts), "parse_batch must map each row to exactly one row"
    return out
