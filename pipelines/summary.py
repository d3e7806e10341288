"""The run summary, computed from the written results so that it always agrees with them."""

from __future__ import annotations

import polars as pl

from pipelines.storage import StorageOptions, protocol_of


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
            pl.col("error").is_null().sum().alias("records_ok"),
            pl.col("error").is_not_null().sum().alias("records_failed"),
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
        results.filter(pl.col("error").is_not_null())
        .group_by(pl.col("error").str.split(":").list.first().alias("kind"))
        .len()
        .sort("len", descending=True)
        .collect()
    )
    row["errors_by_kind"] = {r["kind"]: r["len"] for r in errors.iter_rows(named=True)}
    return row


def _usage() -> list[pl.Expr]:
    return [pl.len().alias("records"), pl.col("error").is_not_null().sum().alias("failed"),
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


def quality(results: pl.LazyFrame, spec) -> dict | None:
    """The job's quality figures where its spec names truth columns; None otherwise."""
    if spec.task == "classify" and spec.classify.label_column:
        return classification_quality(results, spec.classify.label_column, spec.classify.names)
    if spec.task == "extract" and spec.extract.truth_columns:
        return extraction_quality(results, spec.extract.truth_columns)
    return None
