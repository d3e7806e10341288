"""classify and extract on the real engine: every row has a valid typed answer or an error that says why."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import jsonschema
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.config import load_job

REPO = Path(__file__).resolve().parents[2]


def run(job: str, sample: str, tmp_path: Path, rows: int, capsys) -> tuple[dict, pl.DataFrame]:
    """Run a sample job on its first `rows` sample records; return summary and results."""
    table = pq.read_table(REPO / "data/samples" / sample).slice(0, rows)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in/part-0.parquet")
    code = main(["run", str(REPO / f"conf/jobs/{job}.yaml"), "--run-id", "t", "--no-progress", *QUICK_START_ARGS,
                 "--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    summary = json.loads((tmp_path / "out/t/summary.json").read_text())
    results = pl.read_parquet(summary["output"]["results"])
    assert results.height + summary["records_rejected"] == table.num_rows == summary["records_in"]
    return summary, results


@pytest.mark.engine
def test_review_sentiment_labels_are_from_the_list_or_errors(review_run):
    """On the shared review_sentiment run (tests/conftest.py): 80 reviews, a blank one, a repeated id."""
    labels = load_job(REPO / "conf/jobs/review_sentiment.yaml").spec.classify.names
    summary = review_run.summary
    results = pl.read_parquet(summary["output"]["results"])
    assert results.height + summary["records_rejected"] == review_run.input.num_rows == summary["records_in"]

    for row in results.iter_rows(named=True):
        if row["error"] is None:
            assert row["label"] in labels and row["label"] == row["output_text"].strip()
            assert 0 < row["label_probability"] <= 1
        else:
            assert row["label"] is None and row["label_probability"] is None
    rejects = pl.read_parquet(summary["output"]["rejects"]).sort("review_id")
    assert rejects["reason"].to_list() == ["empty_input", "duplicate_id"]
    assert rejects["review_id"][0] == "BAD-BLANK" and rejects["message"].null_count() == 0
    assert results.filter(pl.col("error").is_null()).height == 80

    q = summary["quality"]  # computed on the results: the rejected reviews never got a label
    assert q["records_with_truth"] == 80
    assert q["correct"] == results.filter(pl.col("label") == pl.col("true_sentiment")).height
    assert q["accuracy"] == pytest.approx(q["correct"] / 80, abs=1e-6)
    matrix = q["confusion_matrix"]["counts"]
    assert sum(sum(r.values()) for r in matrix.values()) == 80
    for label in labels:
        predicted = results.filter(pl.col("label") == label).height
        assert q["per_label"][label]["predicted"] == predicted


@pytest.mark.engine
def test_invoice_fields_validate_or_name_the_failing_field(ray_cluster, model_path, tmp_path, capsys):
    spec = load_job(REPO / "conf/jobs/invoice_fields.yaml").spec
    schema, fields = spec.extract.schema_dict, spec.extract.fields
    summary, results = run("invoice_fields", "invoices", tmp_path, 16, capsys)

    assert results.schema["invoice_date"] == pl.Date and results.schema["total"] == pl.Float64
    for row in results.iter_rows(named=True):
        if row["error"] is None:
            obj = {f: row[f].isoformat() if isinstance(row[f], dt.date) else row[f] for f in fields}
            jsonschema.validate(obj, schema, format_checker=jsonschema.FormatChecker())
            assert json.loads(row["output_text"])["invoice_number"] == row["invoice_number"]
        else:
            assert all(row[f] is None for f in fields), "a failed record must not keep half its fields"
            assert row["output_text"], "a failed record keeps its raw text"
            assert row["error_code"] == "parse"
            assert row["error"].startswith(("field '", "output is not valid JSON"))
    ok = results.filter(pl.col("error").is_null()).height
    assert ok >= 8, f"only {ok} of 16 invoices parsed"
    # The code and the message go together, in their own columns: nothing to split.
    assert (results["error_code"].is_null() == results["error"].is_null()).all()
    assert summary["errors_by_kind"].get("parse", 0) == 16 - ok

    q = summary["quality"]["fields"]
    for field, truth in spec.extract.truth_columns.items():
        expect = results.filter(pl.col(field) == pl.col(truth)).height
        assert q[field]["matched"] == expect and q[field]["compared"] == 16
