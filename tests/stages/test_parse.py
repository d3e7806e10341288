"""Parse stage: labels and extracted objects become typed columns, or an error that names the field."""

from __future__ import annotations

import datetime as dt
import math

import pyarrow as pa
import pytest
from pydantic import BaseModel

from pipelines.schema import json_schema_arrow_type, task_fields
from pipelines.stages.parse import parse_batch, parse_labels, parse_objects

SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "string"},
        "total": {"type": "number"},
        "issued": {"type": "string", "format": "date"},
        "lines": {"type": "integer", "minimum": 0},
        "paid": {"type": "boolean"},
    },
    "required": ["number", "total", "issued"],
    "additionalProperties": False,
}


def test_labels_are_kept_or_named_as_errors():
    labels, errors = parse_labels(
        ["positive", " neutral\n", "negat", None, "positive"],
        ["stop", "stop", "length", None, "stop"],
        [None, None, None, "engine: boom", "input: earlier"],
        ["positive", "negative", "neutral"],
    )
    assert labels == ["positive", "neutral", None, None, None]
    assert errors[0] is None and errors[1] is None
    assert errors[2].startswith("label: 'negat' is not one of") and "cut at sampling.max_tokens" in errors[2]
    assert errors[3] == "engine: boom" and errors[4] == "input: earlier"  # earlier errors win


def test_objects_validate_and_errors_name_the_field():
    fields = task_fields("extract", extract=type("E", (), {"schema_dict": SCHEMA})())
    texts = [
        '{"number": "A-1", "total": 12.5, "issued": "2026-11-02", "lines": 3, "paid": true}',
        '{"number": "A-2", "total": "twelve", "issued": "2026-11-02"}',
        '{"number": "A-3", "issued": "2026-11-02"}',
        '{"number": "A-4", "total": 1, "issued": "2026-13-45"}',
        '{"number": "A-5", "total": 1, "iss',
        '{"number": "A-6", "total": 1, "issued": "2026-01-01", "lines": -2, "extra": 1}',
    ]
    n = len(texts)
    columns, errors = parse_objects(texts, ["stop"] * 4 + ["length", "stop"], [None] * n, SCHEMA, fields)
    assert errors[0] is None
    assert columns["number"][0] == "A-1" and columns["total"][0] == 12.5
    assert columns["issued"][0] == dt.date(2026, 11, 2) and columns["lines"][0] == 3 and columns["paid"][0] is True
    assert errors[1] == "field 'total': 'twelve' is not of type 'number'"
    assert errors[2] == "field 'total': required but missing"
    assert errors[3].startswith("field 'issued': '2026-13-45' is not a 'date'")
    assert errors[4].startswith("output is not valid JSON") and "cut at sampling.max_tokens" in errors[4]
    assert "field '(the object)': Additional properties are not allowed ('extra'" in errors[5]
    assert "field 'lines': -2 is less than the minimum of 0" in errors[5]
    for i in range(1, n):  # a failed record gets null fields, never half of them
        assert all(columns[f.name][i] is None for f in fields)


class Address(BaseModel):
    city: str
    zip: str | None = None


class Contract(BaseModel):
    parties: list[str]
    signed: dt.datetime
    address: Address
    notes: str | None = None
    terms: dict


def test_json_schema_types_map_to_arrow_including_pydantic_refs():
    schema = Contract.model_json_schema()
    types = {name: json_schema_arrow_type(node, schema) for name, node in schema["properties"].items()}
    assert types == {
        "parties": pa.list_(pa.string()),
        "signed": pa.timestamp("us", tz="UTC"),
        "address": pa.struct([("city", pa.string()), ("zip", pa.string())]),
        "notes": pa.string(),
        "terms": pa.string(),  # a free-form object is kept as JSON text
    }
    fields = [pa.field(k, v) for k, v in types.items()]
    text = ('{"parties": ["A", "B"], "signed": "2026-11-02T10:00:00+01:00", "address": {"city": "Oslo"}, '
            '"terms": {"net": 30}}')
    columns, errors = parse_objects([text], ["stop"], [None], schema, fields)
    assert errors == [None]
    row = pa.table({f.name: pa.array(columns[f.name], f.type) for f in fields}).to_pylist()[0]
    assert row["signed"] == dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.timezone.utc)
    assert row["address"] == {"city": "Oslo", "zip": None} and row["terms"] == '{"net": 30}'


def test_parse_batch_classify_adds_label_and_probability():
    batch = pa.table({
        "output_text": ["yes", "maybe", None],
        "finish_reason": ["stop", "stop", "abort"],
        "output_logprob": [math.log(0.8), -0.1, None],
        "error_code": pa.array([None, None, None], pa.string()),
        "error": pa.array([None, None, None], pa.string()),
    })
    fields = [pa.field("label", pa.string()), pa.field("label_probability", pa.float64())]
    out = parse_batch(batch, task="classify", labels=["yes", "no"], fields=fields)
    assert out.column("label").to_pylist() == ["yes", None, None]
    assert out.column("label_probability").to_pylist()[0] == pytest.approx(0.8)
    assert out.column("label_probability").to_pylist()[1:] == [None, None]
    codes, errors = out.column("error_code").to_pylist(), out.column("error").to_pylist()
    assert codes == [None, "parse", "engine"]
    assert errors[0] is None and errors[1].startswith("label:") and errors[2] == "request aborted"
