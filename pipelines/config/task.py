"""What a job asks of each record: free text, one label of a list, or typed fields.

`task: classify` and `task: extract` constrain decoding (vLLM structured
outputs) and parse the output into typed result columns; see
`pipelines.stages.parse` and `pipelines.schema.task_fields`.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Label(BaseModel):
    """One class of a classification job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="The label written to the `label` column.")
    description: str | None = Field(None, description="What the label means; goes into the prompt.")

    @field_validator("name")
    @classmethod
    def _no_outer_space(cls, value: str) -> str:
        if value != value.strip():
            raise ValueError(f"label {value!r} has leading or trailing whitespace")
        return value


class ClassifySpec(BaseModel):
    """`task: classify`: each record gets one label of a fixed list."""

    model_config = ConfigDict(extra="forbid")

    labels: list[Label] = Field(
        ..., min_length=2,
        description="The labels, each a name or `{name, description}`; decoding can produce only these.",
    )
    label_column: str | None = Field(
        None, description="Input column holding the known answer; the summary then reports accuracy, "
        "per-label precision and recall, and a confusion matrix. It is copied to the results.",
    )
    probability: bool = Field(
        False, description="Also write `label_probability`: the probability constrained decoding gave the "
        "label's tokens (from the engine's logprobs).",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _names_become_labels(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("labels")
    @classmethod
    def _unique(cls, value: list[Label]) -> list[Label]:
        names = [label.name for label in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"labels repeated: {repeated}")
        return value

    @property
    def names(self) -> list[str]:
        return [label.name for label in self.labels]


def import_object(path: str) -> Any:
    """`package.module:Name` (or `package.module.Name`) imported."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{path!r} is not an import path like package.module:Name")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import {module!r}: {exc}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no {name!r}")
        obj = getattr(obj, part)
    return obj


@functools.lru_cache(maxsize=32)
def _model_schema(path: str) -> dict[str, Any]:
    model = import_object(path)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise ValueError(f"{path!r} is not a pydantic model class")
    return model.model_json_schema()


class ExtractSpec(BaseModel):
    """`task: extract`: each record becomes one JSON object of typed fields, one result column per top-level field."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = Field(
        None, description="The fields as a JSON Schema of `type: object` (give this or `model`).",
    )
    model: str | None = Field(
        None, description="A pydantic model whose JSON Schema gives the fields, by import path "
        "(`package.module:Model`); it must be importable where the job runs.",
    )
    truth_columns: dict[str, str] = Field(
        default_factory=dict, description="Field name to the input column holding its known value; the summary "
        "then reports each field's exact-match rate. The columns are copied to the results.",
    )

    @model_validator(mode="after")
    def _one_schema(self) -> "ExtractSpec":
        if (self.json_schema is None) == (self.model is None):
            raise ValueError("give exactly one of json_schema and model")
        schema = self.schema_dict
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        if schema.get("type") != "object" or not schema.get("properties"):
            raise ValueError("the schema must be `type: object` with `properties` (one result column each)")
        unknown = sorted(set(self.truth_columns) - set(schema["properties"]))
        if unknown:
            raise ValueError(f"truth_columns names fields the schema lacks: {unknown}")
        from pipelines.schema import json_schema_arrow_type

        for name in schema["properties"]:
            json_schema_arrow_type(schema["properties"][name], schema)
        return self

    @property
    def schema_dict(self) -> dict[str, Any]:
        """The JSON Schema, from the spec or the pydantic model."""
        return self.json_schema if self.json_schema is not None else _model_schema(self.model)

    @property
    def fields(self) -> list[str]:
        return list(self.schema_dict["properties"])
