"""The run summary, computed from the written results so that it always agrees with them.

`summary.json` is a `RunSummary`, written and read here only. Its top level is
typed field by field; the sections built by their own functions (cost, cache,
hosted comparison, quality, by shard, by label) stay JSON objects whose keys
those functions and `docs/runs.md` define.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict

from pipelines.config.load import Job
from pipelines.config.storage import StorageOptions
from pipelines.io.storage import join, protocol_of, to_uri, write_json_atomic
from pipelines.run.commit import Manifest, read_record, reject_uris
from pipelines.run.cost import cache_lines, cost_lines, hosted_comparison
from pipelines.schema import LABEL_PROBABILITY_FIELD, task_fields

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"

# The summary's own version: a reader refuses a newer one rather than misread it.
SUMMARY_SCHEMA_VERSION = 5  # 2: `attempt`; 3: `fill_rates`, `drift`, `replay_of`, `stopped`, `budget`, `plan_check`; 4: `plan_warning`;
# 5: `budget.spent_before_first_batch_usd`


class QuarantinedShard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    reason: str | None  # a `pipelines.schema.Reason`
    message: str | None


class SummaryInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    format: str
    shards: int  # committed
    quarantined: list[QuarantinedShard]


class SummaryOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # the run's folder
    format: str
    results: list[str]  # committed files, as URIs
    rejects: list[str]
    # `output.format: openai_batch` only: the batch files and their line counts.
    output_file: str | None = None
    output_lines: int | None = None
    error_file: str | None = None
    error_lines: int | None = None


class AttemptInfo(BaseModel):
    """The attempt that finished the run: who held its lease, and what it found left by earlier ones."""

    model_config = ConfigDict(extra="forbid")

    attempt: str
    holder: str
    lease_token: int  # 1 for the first attempt; one more at every takeover of an expired lease
    took_over_from: str | None = None  # the holder of the expired lease this attempt took over
    shards_lost: int = 0  # committed shards whose files had gone missing, redone by this attempt
    replicas_started: int = 0  # engine replicas this attempt started, restarts included
    nodes_lost: list[str] = []  # Ray nodes that ran a replica of this attempt and were dead at its end
    rows_redone: int = 0  # rows generated more than once: their first answers were lost with a replica or node


class Comparison(BaseModel):
    """One figure of both runs; `limit` and `breached` where a gate covers it."""

    model_config = ConfigDict(extra="forbid")

    metric: str  # e.g. `label_psi`, `fill_rate:amount`, `cost_per_1k_records_usd`
    previous: float | None
    current: float | None
    # current - previous; relative to previous for tokens and cost; the index itself for `label_psi`
    change: float | None
    watch: Literal["rise", "drop", "either"]  # which change a gate limits
    limit: float | None = None
    breached: bool = False


class Drift(BaseModel):
    """The summary's `drift` section."""

    model_config = ConfigDict(extra="forbid")

    previous_run: str | None  # None: no earlier successful run of this job under this output path
    previous_finished_at: str | None = None
    status: Literal["passed", "gate_failed", "not_compared"]
    gated: bool  # both runs had `gates.min_records` records, so limits applied
    comparisons: list[Comparison] = []

    @property
    def breaches(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.breached]


class BudgetFigures(BaseModel):
    """The summary's `budget` section: the caps, what was spent against them, and by how much it passed them."""

    model_config = ConfigDict(extra="forbid")

    max_usd: float | None
    max_output_tokens: int | None
    spent_usd: float  # in the run's cost mode, every attempt's engine work (committed or not)
    spent_output_tokens: int
    batches: int  # sent to an engine by this attempt
    batches_refused: int
    largest_batch_usd: float
    overshoot_usd: float  # spend past max_usd (0 when within it)
    overshoot_batches: float  # that, in batches of the largest batch's cost
    # Spend (earlier attempts' included) when this attempt's first batch asked to go: in accelerator time, what
    # the replicas cost while they started and waited for input. None when no batch asked.
    spent_before_first_batch_usd: float | None = None


class ReplayOf(BaseModel):
    """A replay's lineage (`tokenmill rejects replay`): the run whose rejects it ran again."""

    model_config = ConfigDict(extra="forbid")

    run: str  # the original run's folder
    run_id: str
    reasons: list[str]  # the `Reason`s replayed
    records: int  # rejected records staged for the replay


class RunSummary(BaseModel):
    """`summary.json`: what a run did and cost, from its committed files."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SUMMARY_SCHEMA_VERSION
    run_id: str
    job: str
    job_spec: str
    engine: str
    model: str
    lora: dict[str, Any] | None  # `pipelines.models.adapters.Adapter`
    started_at: str
    finished_at: str
    wall_s: float
    task: str
    resumed: bool
    shards_redone: int
    records_in: int
    records_out: int  # generated (ok or failed to parse)
    records_ok: int
    records_failed: int  # generated but failed, plus rejected
    records_rejected: int  # never generated
    distinct_ids: int
    duplicate_ids: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    work_units: float
    cost_usd: float
    compute_usd: float
    overhead_usd: float
    records_cached: int  # answered from the response cache
    cached_records_prompt_tokens: int
    cached_records_cached_prompt_tokens: int
    cached_records_completion_tokens: int
    errors_by_kind: dict[str, int]
    records_per_s: float | None
    output_tokens_per_s: float | None
    engine_start_s: float | None
    engine_replicas: int
    engine_dtype: str | None
    steady_output_tokens_per_s: float | None
    cost: dict[str, Any]  # `pipelines.run.cost.cost_lines`
    cache: dict[str, Any] | None  # `pipelines.run.cost.cache_lines`
    price: dict[str, Any]
    input: SummaryInput
    output: SummaryOutput
    hosted_comparison: dict[str, dict[str, Any]]
    by_shard: dict[str, dict[str, Any]] | None = None
    by_label: dict[str, dict[str, Any]] | None = None
    quality: dict[str, Any] | None = None
    attempt: AttemptInfo | None = None
    fill_rates: dict[str, float | None] | None = None  # each task field's share of generated records that have it
    drift: Drift | None = None  # against the previous successful run of the job (`pipelines.run.drift`)
    replay_of: ReplayOf | None = None  # a replay of another run's rejects
    stopped: Literal["budget"] | None = None  # a run that stopped before its end: the summary of what it committed
    budget: BudgetFigures | None = None  # with `budget:` in the spec
    # `tokenmill plan`'s estimates (from a sample, made as the run started) against the run: records, tokens,
    # wall time and cost, each {estimate, actual, error_pct}
    plan_check: dict[str, dict[str, float | None]] | None = None
    # Why that estimate may not hold: its figures were calibrated on another machine, or never measured
    plan_warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As written to `summary.json` (and printed by `tokenmill run --json`)."""
        return self.model_dump(mode="json")


def write_summary(fs, run_root: str, summary: RunSummary) -> None:
    write_json_atomic(fs, join(run_root, SUMMARY_FILE), summary.to_json())


def read_summary(fs, run_root: str) -> RunSummary | None:
    """The run's `summary.json`, or None where there is none; a newer or damaged one is an error naming it."""
    return read_record(RunSummary, fs, join(run_root, SUMMARY_FILE), version=SUMMARY_SCHEMA_VERSION,
                       name="run summary")


def scan_results(uris: list[str], storage: StorageOptions, *, with_file: bool = False) -> pl.LazyFrame | None:
    """Parquet files (results or rejects) as one lazy polars frame, local or in object storage; None if none.

    With `with_file`, a `_file` column names each row's file.
    """
    if not uris:
        return None
    opts = storage.polars_kwargs(protocol_of(uris[0]))
    return pl.scan_parquet(uris, storage_options=opts or None, include_file_paths="_file" if with_file else None)


def reject_totals(rejects: pl.LazyFrame | None) -> dict:
    """How many rows were rejected, by reason."""
    if rejects is None:
        return {"rows": 0, "by_reason": {}}
    # A row with no row index stands for a quarantined shard, not a record.
    counts = rejects.filter(pl.col("row").is_not_null()).group_by("reason").len().sort("len", descending=True)
    by_reason = {r["reason"]: r["len"] for r in counts.collect().iter_rows(named=True)}
    return {"rows": sum(by_reason.values()), "by_reason": by_reason}


def result_totals(results: pl.LazyFrame | None, id_column: str) -> dict:
    """Counts, token totals and cost of a run's results (rows the engine generated)."""
    if results is None:
        return {"records_out": 0, "records_ok": 0, "records_failed": 0, "distinct_ids": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "cached_prompt_tokens": 0, "work_units": 0.0, "cost_usd": 0.0,
                "compute_usd": 0.0, "overhead_usd": 0.0, "records_cached": 0, "cached_records_prompt_tokens": 0,
                "cached_records_cached_prompt_tokens": 0, "cached_records_completion_tokens": 0,
                "errors_by_kind": {}}
    # Results written before the response cache existed have no `cached` column.
    from_cache = (pl.col("cached").fill_null(False) if "cached" in results.collect_schema().names()
                  else pl.lit(False))
    row = (
        results.select(
            pl.len().alias("records_out"),
            pl.col("error_code").is_null().sum().alias("records_ok"),
            pl.col("error_code").is_not_null().sum().alias("records_failed"),
            pl.col(id_column).n_unique().alias("distinct_ids"),
            pl.col("prompt_tokens").fill_null(0).sum().alias("prompt_tokens"),
            pl.col("completion_tokens").fill_null(0).sum().alias("completion_tokens"),
            pl.col("cached_prompt_tokens").fill_null(0).sum().alias("cached_prompt_tokens"),
            pl.col("work_units").sum().alias("work_units"),
            pl.col("cost_usd").sum().alias("cost_usd"),
            pl.col("compute_usd").sum().alias("compute_usd"),
            pl.col("overhead_usd").sum().alias("overhead_usd"),
            # Answers from the response cache: their tokens are the engine work the run did not do.
            from_cache.sum().alias("records_cached"),
            pl.col("prompt_tokens").filter(from_cache).fill_null(0).sum().alias("cached_records_prompt_tokens"),
            pl.col("cached_prompt_tokens").filter(from_cache).fill_null(0).sum()
            .alias("cached_records_cached_prompt_tokens"),
            pl.col("completion_tokens").filter(from_cache).fill_null(0).sum().alias("cached_records_completion_tokens"),
        )
        .collect()
        .row(0, named=True)
    )
    errors = (
        results.filter(pl.col("error_code").is_not_null())
        .group_by(pl.col("error_code").alias("kind"))
        .len()
        .sort("len", descending=True)
        .collect()
    )
    row["errors_by_kind"] = {r["kind"]: r["len"] for r in errors.iter_rows(named=True)}
    return row


def _usage() -> list[pl.Expr]:
    return [pl.len().alias("records"), pl.col("error_code").is_not_null().sum().alias("failed"),
            pl.col("prompt_tokens").sum().alias("prompt_tokens"),
            pl.col("completion_tokens").sum().alias("completion_tokens"),
            pl.col("cost_usd").sum().alias("cost_usd")]


def _rows(frame: pl.DataFrame, key: str) -> dict[str, dict]:
    out = {}
    for r in frame.iter_rows(named=True):
        name = r.pop(key)
        r["cost_per_1k_records_usd"] = 1000 * r["cost_usd"] / r["records"] if r["records"] else None
        out[name] = r
    return out


def by_shard(results: pl.LazyFrame, shard_of_file: dict[str, str]) -> dict[str, dict]:
    """Records, tokens and cost per input shard (results files live under `results/<shard key>/`)."""
    keyed = results.with_columns(
        pl.col("_file").str.split("/").list.get(-2).replace_strict(shard_of_file, default=None).alias("shard"))
    return _rows(keyed.group_by("shard").agg(_usage()).sort("shard").collect(), "shard")


def by_label(results: pl.LazyFrame) -> dict[str, dict]:
    """Records, tokens and cost per predicted label; `(none)` for records that got none."""
    keyed = results.with_columns(pl.col("label").fill_null("(none)"))
    return _rows(keyed.group_by("label").agg(_usage()).sort("records", descending=True).collect(), "label")


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def classification_quality(results: pl.LazyFrame, truth: str, labels: list[str], predicted: str = "label") -> dict:
    """Accuracy, per-label precision/recall/F1 and the confusion matrix against a truth column.

    Records whose truth is null are left out; a record with no label (an error)
    counts as wrong and appears in the matrix's `(none)` column.
    """
    pairs = (
        results.filter(pl.col(truth).is_not_null())
        .select(pl.col(truth).cast(pl.String).alias("truth"), pl.col(predicted).fill_null("(none)").alias("pred"))
        .group_by("truth", "pred")
        .len()
        .collect()
    )
    counts = {(r["truth"], r["pred"]): r["len"] for r in pairs.iter_rows(named=True)}
    total = sum(counts.values())
    correct = sum(n for (t, p), n in counts.items() if t == p)
    truths = sorted({t for t, _ in counts}, key=lambda v: (v not in labels, labels.index(v) if v in labels else v))
    columns = [*labels, *sorted({p for _, p in counts} - set(labels) - {"(none)"}), "(none)"]
    per_label = {}
    for label in labels:
        tp = counts.get((label, label), 0)
        predicted_n = sum(n for (_, p), n in counts.items() if p == label)
        actual_n = sum(n for (t, _), n in counts.items() if t == label)
        precision, recall = _ratio(tp, predicted_n), _ratio(tp, actual_n)
        f1 = (round(2 * precision * recall / (precision + recall), 6)
              if precision is not None and recall is not None and precision + recall > 0 else None)
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual_n,
                            "predicted": predicted_n}
    return {
        "truth_column": truth,
        "records_with_truth": total,
        "correct": correct,
        "accuracy": _ratio(correct, total),
        "per_label": per_label,
        "confusion_matrix": {"rows": "truth", "columns": "predicted",
                             "counts": {t: {p: counts.get((t, p), 0) for p in columns} for t in truths}},
    }


def _truth_as(truth: str, truth_type: pl.DataType, field_type: pl.DataType) -> pl.Expr:
    """The truth column in the field's type; text truth for a date or time field is parsed (ISO 8601)."""
    col = pl.col(truth)
    if truth_type == pl.String and field_type == pl.Date:
        return col.str.to_date(strict=False)
    if truth_type == pl.String and isinstance(field_type, pl.Datetime):
        return col.str.to_datetime(strict=False, time_zone="UTC").cast(field_type, strict=False)
    return col.cast(field_type, strict=False)


def extraction_quality(results: pl.LazyFrame, truth_columns: dict[str, str]) -> dict:
    """Per-field exact-match rate against truth columns (truth cast to the field's type).

    Records whose truth is null are left out; a record that failed (null field)
    counts as a miss.
    """
    schema = results.collect_schema()
    exprs = []
    for field, truth in truth_columns.items():
        has_truth = pl.col(truth).is_not_null()
        match = pl.col(field).eq_missing(_truth_as(truth, schema[truth], schema[field])) & has_truth
        exprs += [has_truth.sum().alias(f"{field}\0n"), match.sum().alias(f"{field}\0ok")]
    row = results.select(exprs).collect().row(0, named=True) if exprs else {}
    fields = {}
    for field, truth in truth_columns.items():
        n, ok = row[f"{field}\0n"], row[f"{field}\0ok"]
        fields[field] = {"truth_column": truth, "compared": n, "matched": ok, "exact_match_rate": _ratio(ok, n)}
    rates = [f["exact_match_rate"] for f in fields.values() if f["exact_match_rate"] is not None]
    return {"fields": fields, "mean_exact_match_rate": round(sum(rates) / len(rates), 6) if rates else None}


def fill_rates(results: pl.LazyFrame, fields: list[str]) -> dict[str, float | None]:
    """Each field's share of the generated records that have it (not null)."""
    if not fields:
        return {}
    row = results.select([pl.len().alias("\0n"), *(pl.col(f).is_not_null().sum().alias(f) for f in fields)]
                         ).collect().row(0, named=True)
    return {f: _ratio(row[f], row["\0n"]) for f in fields}


def quality(results: pl.LazyFrame, spec) -> dict | None:
    """The job's quality figures where its spec names truth columns; None otherwise."""
    if spec.task == "classify" and spec.classify.label_column:
        return classification_quality(results, spec.classify.label_column, spec.classify.names)
    if spec.task == "extract" and spec.extract.truth_columns:
        return extraction_quality(results, spec.extract.truth_columns)
    return None


def summarize(job: Job, run_id: str, manifests: dict[str, Manifest], storage: StorageOptions, *, adapter, engine,
              wall: float, started_at: dt.datetime, resumed: bool, shards_redone: int,
              attempt: AttemptInfo | None = None) -> RunSummary:
    """The run's summary from its committed files only, so it always agrees with what readers see."""
    spec = job.spec
    protocol = protocol_of(spec.output.path)
    committed = [m for m in manifests.values() if m.state == "committed"]
    quarantined = [QuarantinedShard(path=m.path, reason=m.reason, message=m.message) for m in manifests.values()
                   if m.state == "quarantined"]
    files = sorted(to_uri(f, protocol) for m in committed for f in m.results)
    reject_files = reject_uris(manifests, protocol)
    results = scan_results(files, storage, with_file=True)
    totals = result_totals(results, spec.id_column)
    rejects = reject_totals(scan_results(reject_files, storage))
    records_in = sum(m.rows or 0 for m in committed)
    kinds = dict(totals.pop("errors_by_kind"))
    for kind, n in rejects["by_reason"].items():
        kinds[kind] = kinds.get(kind, 0) + n
    cost = cost_lines(job, totals, engine)
    found = quality(results, spec) if results is not None else None
    if totals["records_out"] + rejects["rows"] != records_in:
        log.error("run %s: %d records in committed shards but %d results and %d rejects", run_id, records_in,
                  totals["records_out"], rejects["rows"])
    return RunSummary.model_validate({
        "run_id": run_id,
        "job": spec.name,
        "job_spec": str(job.spec_path),
        "engine": job.engine.name,
        "model": job.engine.display_model,
        "lora": dataclasses.asdict(adapter) if adapter else None,
        "started_at": started_at.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "task": spec.task,
        "resumed": resumed,
        "shards_redone": shards_redone,
        "records_in": records_in,
        **totals,
        "records_rejected": rejects["rows"],
        "records_failed": totals["records_failed"] + rejects["rows"],
        "duplicate_ids": rejects["by_reason"].get("duplicate_id", 0),
        "errors_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "records_per_s": round(totals["records_out"] / wall, 3) if wall and totals["records_out"] else None,
        "output_tokens_per_s": round(totals["completion_tokens"] / wall, 3) if wall else None,
        "engine_start_s": round(max(engine.engine_start_s), 3) if engine.engine_start_s else None,
        "engine_replicas": engine.replicas,
        # What the engines computed in: `auto` on CPU is decided on each node (`pipelines.stages.engine.engine_dtype`).
        "engine_dtype": ", ".join(sorted(engine.dtypes)) or None,
        "steady_output_tokens_per_s": round(engine.output_tokens / engine.steady_s, 3) if engine.steady_s else None,
        "cost": cost,
        "cache": cache_lines(job, totals, cost),
        "price": {"model": job.engine.display_model, **job.price.model_dump(mode="json")},
        "input": SummaryInput(path=spec.input.path, format=spec.input.format, shards=len(committed),
                              quarantined=quarantined),
        "output": SummaryOutput(path=join(spec.output.path, run_id), format=spec.output.format, results=files,
                                rejects=reject_files),
        "hosted_comparison": hosted_comparison(totals, cost["total_usd"], job.hosted),
        "by_shard": by_shard(results, {k: m.path for k, m in manifests.items()}) if results is not None else None,
        "by_label": by_label(results) if results is not None and spec.task == "classify" else None,
        "quality": found,
        "attempt": attempt,
        "fill_rates": fill_rates(results, [f.name for f in task_fields(spec.task, spec.classify, spec.extract)
                                           if f.name != LABEL_PROBABILITY_FIELD.name]) if results is not None else None,
    })
