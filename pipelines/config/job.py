"""Job specs: `conf/jobs/<name>.yaml`, the one description of a batch job."""

from __future__ import annotations

import os
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.config.storage import StorageOptions
from pipelines.config.task import ClassifySpec, ExtractSpec
from pipelines.schema import RESERVED_NAMES, STAGED_COLUMNS

OPENAI_ID = "custom_id"


def template_fields(template: str) -> list[str]:
    """The `{column}` placeholders of a prompt template, in order, once each."""
    names: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        # Only the plain column: `str.format` would otherwise evaluate attribute access and indexing on the
        # record's values, and pad or convert them as a format spec or `!r` says (`{body:>999999999}` is a
        # gigabyte a row), all decided by whoever writes the template.
        if not field.isidentifier():
            raise ValueError(
                f"placeholder {{{field}}} must name one input column (use {{{{ and }}}} for literal braces)"
            )
        if spec or conversion:
            written = f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            raise ValueError(f"placeholder {written}: no format spec or conversion, only {{{field}}}")
        if field not in names:
            names.append(field)
    return names


class InputSpec(BaseModel):
    """Where the records come from."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="A file or folder of shards: local path, `s3://` or `gs://`.")
    format: Literal["parquet", "openai_batch"] = Field(
        "parquet", description="`parquet` (one record a row), or `openai_batch`: OpenAI Batch API request "
        "files (`.jsonl`, one chat-completion request a line); their messages replace `prompt`, their "
        "parameters override `sampling`, and `custom_id` is the id.",
    )
    id_column: str | None = Field(
        None, description="Column that identifies each record; copied to the output. Required for Parquet; "
        "`custom_id` for OpenAI batch files.",
    )
    columns: list[str] | None = Field(
        None, description="Columns to read; default: the id, the template's placeholders and the passthrough columns."
    )
    duplicate_ids: Literal["keep_first", "reject"] = Field(
        "keep_first", description="A repeated id: `keep_first` processes its first occurrence (in shard order) and "
        "rejects the others; `reject` rejects every occurrence. The summary counts them.",
    )

    @model_validator(mode="after")
    def _id_column(self) -> "InputSpec":
        if self.format == "openai_batch":
            if self.id_column not in (None, OPENAI_ID):
                raise ValueError(f"id_column: OpenAI batch files are keyed by {OPENAI_ID!r}")
            if self.columns is not None:
                raise ValueError("columns: OpenAI batch files have a fixed layout; leave it out")
            self.id_column = OPENAI_ID
        elif self.id_column is None:
            raise ValueError("id_column: required for Parquet input")
        return self


IMAGE_MAX_BYTES = 20 * 2**20


def _uri_parts(uri: str) -> tuple[str, str]:
    """(scheme, rest) of a URI, the scheme lower-cased; a plain path is `file`."""
    if "://" not in uri:
        return "file", uri
    scheme, rest = uri.split("://", 1)
    return scheme.lower(), rest


def image_prefix_problem(prefix: str) -> str | None:
    """Why `prefix` cannot be an allowed image location, or None."""
    scheme, rest = _uri_parts(prefix)
    if "::" in prefix:
        return "chained fsspec URLs (`a::b`) are not allowed"
    if not scheme.isidentifier():
        return f"{scheme!r} is not a URI scheme"
    if scheme == "file":
        return None if rest.startswith("/") else "a local prefix must be an absolute path"
    if not rest.split("/", 1)[0]:
        return "name the bucket or host"
    if "@" in rest.split("/", 1)[0]:
        return "no user or password in the URI"
    return None


class ImageFetchSpec(BaseModel):
    """Where image references in the data may point, and how much may be fetched.

    The data decides which objects are fetched, with the pipeline's own credentials:
    without a fence, one row could read another team's bucket or the cloud metadata service.
    """

    model_config = ConfigDict(extra="forbid")

    allow: list[str] | None = Field(
        None, description="URI prefixes image references may name (`s3://bucket/images/`, "
        "`https://cdn.example.com/`, `/data/images/`). Default: the input's own bucket (for local input, its "
        "folder). http(s) is fetched only from a prefix listed here.",
    )
    max_bytes: int = Field(IMAGE_MAX_BYTES, ge=1, description="Largest image fetched or accepted inline, in bytes.")
    allow_link_local: bool = Field(
        False, description="Fetch from hosts whose address is link-local (169.254.0.0/16, fe80::/10: cloud "
        "metadata services). Off unless you mean it.",
    )

    @field_validator("allow")
    @classmethod
    def _prefixes(cls, value: list[str] | None) -> list[str] | None:
        for prefix in value or []:
            problem = image_prefix_problem(prefix)
            if problem:
                raise ValueError(f"{prefix!r}: {problem}")
        return value


def default_image_prefix(input_path: str) -> str:
    """The input's own bucket (`s3://bucket/`) or, for a local input, its folder."""
    scheme, rest = _uri_parts(input_path)
    if scheme == "file":
        path = os.path.abspath(rest)
        folder = path if not path.endswith((".parquet", ".jsonl")) else os.path.dirname(path)
        return folder.rstrip("/") + "/"
    return f"{scheme}://{rest.split('/', 1)[0]}/"


class PromptSpec(BaseModel):
    """The chat messages each record becomes; `{column}` placeholders take the record's values."""

    model_config = ConfigDict(extra="forbid")

    system: str | None = Field(None, description="System message (may hold placeholders too).")
    user: str = Field(..., description="User message template with `{column}` placeholders.")
    image_column: str | None = Field(
        None,
        description="Column holding an image (bytes, or a local path / `s3://` / `gs://` URI) that goes "
        "before the text in the user message; for multimodal engine profiles.",
    )
    images: ImageFetchSpec = Field(
        default_factory=ImageFetchSpec,
        description="Where `image_column` references may be fetched from, and the size cap.",
    )
    task_instructions: bool = Field(
        True, description="For `classify` and `extract`: append the labels (with their descriptions) or the "
        "JSON Schema to the system message, so the model knows what decoding will allow.",
    )

    @field_validator("system", "user")
    @classmethod
    def _placeholders_are_columns(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    @property
    def columns(self) -> list[str]:
        """Every input column the prompt reads: the placeholders, then the image column."""
        names = template_fields(self.system or "")
        names += [n for n in template_fields(self.user) if n not in names]
        if self.image_column and self.image_column not in names:
            names.append(self.image_column)
        return names


class LoraSpec(BaseModel):
    """A LoRA adapter applied to every record of the job."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Adapter folder (PEFT format): local path, `s3://` or `gs://`.")
    name: str | None = Field(None, description="Name in logs and the summary; default the folder's name.")


class SamplingSpec(BaseModel):
    """Sampling parameters, as vLLM's `SamplingParams` names them."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1, description="Most tokens generated per record.")
    temperature: float = Field(0.0, ge=0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set of this mass.")
    top_k: int | None = Field(None, ge=1, description="Keep only the k likeliest tokens; none means all.")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before a stop or EOS may end generation.")
    seed: int | None = Field(None, description="Per-request seed, for reproducible sampling at temperature > 0.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation.")
    presence_penalty: float = Field(0.0, description="Penalty on tokens already present in the output.")
    frequency_penalty: float = Field(0.0, description="Penalty growing with how often a token appeared.")
    repetition_penalty: float = Field(1.0, gt=0, description="Multiplicative penalty on repeated tokens (1 = off).")
    ignore_eos: bool = Field(False, description="Generate max_tokens whatever the model says (benchmarks).")


class OutputSpec(BaseModel):
    """Where results go: `<path>/<run_id>/results/*.parquet` and `<path>/<run_id>/summary.json`."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., description="Output folder: local path, `s3://` or `gs://`.")
    passthrough: list[str] = Field(default_factory=list, description="Input columns copied to the results.")
    include_token_ids: bool = Field(
        False, description="Also write `prompt_token_ids` and `output_token_ids` (audits, debugging)."
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec.")

    @property
    def parquet_compression(self) -> str | None:
        return None if self.compression == "none" else self.compression
    format: Literal["parquet", "openai_batch"] = Field(
        "parquet", description="`openai_batch` also writes `output.jsonl` and `errors.jsonl` in the OpenAI Batch "
        "API's output shape beside the Parquet results; every record is in exactly one of the two.",
    )

    @field_validator("passthrough")
    @classmethod
    def _no_clash_with_results(cls, value: list[str]) -> list[str]:
        clash = sorted(set(value) & RESERVED_NAMES)
        if clash:
            raise ValueError(f"{clash} would overwrite result columns of the same name")
        return value


class FailureSpec(BaseModel):
    """When a run gives up: the circuit breaker."""

    model_config = ConfigDict(extra="forbid")

    max_share: float = Field(
        0.1, gt=0, le=1, description="Stop the run when more than this share of the records processed so far "
        "failed (rejected, or generated but unparsable); what was committed stays valid and `--resume` goes on.",
    )
    min_records: int = Field(200, ge=1, description="Records processed before the share is judged.")


class CostSpec(BaseModel):
    """How the run's cost is counted and shared among its records."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["per_token", "accelerator_time"] = Field(
        "per_token", description="`per_token`: each record at the price book's token prices for the model (what a "
        "hosted API would bill). `accelerator_time`: the replicas' wall time from engine start to shutdown at the "
        "price book's hourly rate for the engine profile's `cost.accelerator`, shared among the records by the work "
        "each caused, start-up and idle time apart (`overhead_usd`).",
    )


class CacheSpec(BaseModel):
    """The response cache: answers kept across runs, keyed by what decides them (`pipelines.io.response_cache`)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        ..., description="Folder of the cache: local path, `s3://` or `gs://`. Jobs may share one: a key holds the "
        "model, the engine settings that change answers, the sampling, the constraint, the adapter and the prompt.",
    )
    read: bool = Field(
        True, description="Answer requests found in the cache from it; false generates every request again and "
        "refreshes the cache.",
    )


class ActorPoolSpec(BaseModel):
    """How many engine replicas run; Ray scales between min and max."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1, description="Replicas kept running.")
    max: int = Field(1, ge=1, description="Most replicas Ray may scale up to when resources allow.")

    @model_validator(mode="after")
    def _ordered(self) -> "ActorPoolSpec":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
        return self


class LeaseSpec(BaseModel):
    """One live attempt per run (`pipelines.run.lease`): how long an attempt's hold on its run lasts unrenewed."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float = Field(
        60.0, ge=1, description="Seconds an attempt's lease on its run lasts without a renewal (renewed every third "
        "of it). A second attempt is refused while the lease is live and takes it over once it has expired, e.g. "
        "after the first attempt's driver was killed; a paused attempt that finds its lease gone stops committing.",
    )
    wait_s: float = Field(
        0.0, ge=0, description="How long a second attempt waits for a live lease to end before refusing; "
        "`tokenmill run --wait SECONDS` sets it.",
    )


class BudgetSpec(BaseModel):
    """A hard cap on what a run may spend: once committed spend plus the work in flight would pass it, no new
    batch goes to an engine; the batches in flight finish, the run stops (exit code 9, `stopped: budget`, no
    `_SUCCESS`), and running it again with a higher cap resumes it."""

    model_config = ConfigDict(extra="forbid")

    max_usd: float | None = Field(None, gt=0, description="Most dollars the run may cost, in its cost mode.")
    max_output_tokens: int | None = Field(None, ge=1, description="Most output tokens the run may generate.")

    @property
    def capped(self) -> bool:
        return self.max_usd is not None or self.max_output_tokens is not None


class GatesSpec(BaseModel):
    """Drift gates: how far a run may move from the previous successful run of the job under the same output
    path before it ends with exit code 8 (its results committed and kept, `_SUCCESS` saying `gate_failed`).

    Every comparison is made and reported whether or not it is gated; a limit left out gates nothing.
    Rates are shares of records (0 to 1); changes in `*_change_max` are relative (0.25: 25% either way).
    """

    model_config = ConfigDict(extra="forbid")

    label_psi_max: float | None = Field(
        None, ge=0, description="Most population stability index between the two runs' label distributions "
        "(`classify`); 0.1 is a small shift, 0.25 a large one.")
    fill_rate_drop_max: float | None = Field(
        None, ge=0, le=1, description="Most drop of any field's fill rate (records whose field is not null).")
    exact_match_drop_max: float | None = Field(
        None, ge=0, le=1, description="Most drop of any field's exact-match rate, or of the accuracy, against "
        "the truth columns, where the job has them.")
    parse_error_rate_rise_max: float | None = Field(
        None, ge=0, le=1, description="Most rise of the share of records whose answer failed to parse.")
    reject_rate_rise_max: float | None = Field(
        None, ge=0, le=1, description="Most rise of the share of records rejected before the engine.")
    tokens_per_record_change_max: float | None = Field(
        None, ge=0, description="Most relative change of the mean tokens (prompt and output) per record.")
    cost_per_1k_change_max: float | None = Field(
        None, ge=0, description="Most relative change of the cost per 1,000 records.")
    min_records: int = Field(
        20, ge=1, description="Gate only when both runs have at least this many records: small nights drift by "
        "chance. The comparison is reported either way.")


class PlanFigures(BaseModel):
    """What `tokenmill plan` cannot know before a first night: how much the job's model writes per record.
    `tokenmill bench calibrate JOB` measures it and prints this section. Once the job has a successful run
    under its output path, that run's figure is used instead."""

    model_config = ConfigDict(extra="forbid")

    output_tokens_per_record: float | None = Field(
        None, gt=0, description="Mean output tokens per generated record, as measured (never above "
        "`sampling.max_tokens`); none means the plan falls back to the task's own bound.")
    measured: str | None = Field(
        None, description="How, on what and when the figure was measured; shown beside every estimate made from it.")


class JobSpec(BaseModel):
    """A whole job: `conf/jobs/<name>.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Job name; part of every run id.")
    description: str = Field("", description="Free text for people reading the spec.")
    engine: str = Field(..., description="Engine profile name, found as `conf/engines/<engine>.yaml`.")
    task: Literal["generate", "classify", "extract"] = Field(
        "generate", description="`generate`: free text. `classify`: one label of `classify.labels`. "
        "`extract`: typed fields of `extract`'s JSON Schema. The last two constrain decoding to what they allow.",
    )
    classify: ClassifySpec | None = Field(None, description="The labels, for `task: classify`.")
    extract: ExtractSpec | None = Field(None, description="The fields, for `task: extract`.")
    input: InputSpec
    prompt: PromptSpec | None = Field(None, description="The messages; required unless the input is OpenAI batch files.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    lora: LoraSpec | None = Field(None, description="A LoRA adapter for the whole job; none means the base model.")
    actors: ActorPoolSpec = Field(default_factory=ActorPoolSpec)
    failures: FailureSpec = Field(default_factory=FailureSpec)
    cost: CostSpec = Field(default_factory=CostSpec)
    cache: CacheSpec | None = Field(
        None, description="Reuse answers of earlier runs (and of repeats within a run); none means no cache.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="A hard spending cap (none by default).")
    gates: GatesSpec = Field(
        default_factory=GatesSpec, description="Drift gates against the previous successful run (none by default).")
    plan: PlanFigures = Field(
        default_factory=PlanFigures, description="Measured figures `tokenmill plan` estimates a first night from.")
    batch_size: int | None = Field(
        None, ge=1,
        description="Records per batch sent to an engine replica; default the engine's `max_num_seqs`, "
        "so that each call fills the engine (smaller batches let it drain between calls).",
    )
    lease: LeaseSpec = Field(default_factory=LeaseSpec)
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object-store access.")

    @property
    def id_column(self) -> str:
        assert self.input.id_column is not None  # set by InputSpec's validator
        return self.input.id_column

    @property
    def prompt_columns(self) -> list[str]:
        return self.prompt.columns if self.prompt else []

    @property
    def truth_columns(self) -> list[str]:
        """Input columns holding known answers, for the summary's quality figures."""
        if self.task == "classify" and self.classify is not None and self.classify.label_column:
            return [self.classify.label_column]
        if self.task == "extract" and self.extract is not None:
            return list(dict.fromkeys(self.extract.truth_columns.values()))
        return []

    @property
    def carried_columns(self) -> list[str]:
        """Input columns copied to the results after the id: passthrough, truth, the request file's line."""
        extra = ["line"] if self.input.format == "openai_batch" else []
        return list(dict.fromkeys([*self.output.passthrough, *self.truth_columns, *extra]))

    @property
    def read_columns(self) -> list[str]:
        """Every input column the job needs, the id first."""
        if self.input.format == "openai_batch":
            return list(STAGED_COLUMNS)
        wanted = self.input.columns or [*self.prompt_columns, *self.carried_columns]
        return [self.id_column, *[c for c in dict.fromkeys(wanted) if c != self.id_column]]

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.id_column in RESERVED_NAMES:
            raise ValueError(f"input.id_column {self.id_column!r} clashes with a result column of that name")
        for kind in ("classify", "extract"):
            if (self.task == kind) != (getattr(self, kind) is not None):
                raise ValueError(f"{kind}: give this section exactly when task is {kind!r} (task is {self.task!r})")
        if self.input.format == "openai_batch":
            if self.prompt is not None:
                raise ValueError("prompt: OpenAI batch files carry their own messages; leave prompt out")
            if self.task != "generate":
                raise ValueError("task: OpenAI batch requests set their own response_format; use task: generate")
        elif self.prompt is None:
            raise ValueError("prompt: required key is missing")
        if self.input.columns is not None:
            missing = [c for c in [*self.prompt_columns, *self.carried_columns] if c not in self.input.columns]
            if missing:
                raise ValueError(f"input.columns lacks {missing}, which the prompt, output.passthrough or "
                                 "the truth columns use")
        if self.task == "extract" and self.extract is not None:
            taken = {self.id_column, *self.carried_columns, *RESERVED_NAMES}
            clash = [f for f in self.extract.fields if f in taken]
            if clash:
                raise ValueError(f"extract: fields {clash} clash with the id, carried or result columns of that name")
        if self.task == "classify":
            taken = {self.id_column, *self.carried_columns}
            clash = [c for c in ("label", "label_probability") if c in taken]
            if clash:
                raise ValueError(f"classify: input columns {clash} clash with the result columns of that name")
        return self
