"""Quality figures on fixed tables whose answers are known by hand."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from pipelines.run.summary import classification_quality, extraction_quality


def test_classification_metrics_on_a_known_table():
    results = pl.LazyFrame({
        "truth": ["a", "a", "a", "b", "b", "c", None],
        "label": ["a", "a", "b", "b", None, "c", "a"],  # None: the record failed to parse
    })
    q = classification_quality(results, "truth", ["a", "b", "c"])
    assert q["records_with_truth"] == 6 and q["correct"] == 4
    assert q["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    a, b, c = (q["per_label"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"], a["predicted"]) == (1.0, pytest.approx(2 / 3, abs=1e-6), 3, 2)
    assert a["f1"] == pytest.approx(0.8, abs=1e-6)
    assert (b["precision"], b["recall"], b["f1"]) == (0.5, 0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (1.0, 1.0, 1.0)
    assert q["confusion_matrix"]["counts"] == {
        "a": {"a": 2, "b": 1, "c": 0, "(none)": 0},
        "b": {"a": 0, "b": 1, "c": 0, "(none)": 1},
        "c": {"a": 0, "b": 0, "c": 1, "(none)": 0},
    }


def test_a_label_never_predicted_has_no_precision():
    q = classification_quality(pl.LazyFrame({"t": ["x", "y"], "label": ["x", "x"]}), "t", ["x", "y"])
    assert q["per_label"]["y"] == {"precision": None, "recall": 0.0, "f1": None, "support": 1, "predicted": 0}
    assert q["per_label"]["x"]["precision"] == 0.5


def test_extraction_exact_match_per_field_with_truth_cast_to_the_field_type():
    results = pl.LazyFrame({
        "total": [10.5, 3.0, None, 7.25],
        "true_total": [10.5, 3.5, 4.0, None],  # row 3: no truth, left out
        "issued": [dt.date(2026, 1, 2), dt.date(2026, 2, 3), None, dt.date(2026, 4, 5)],
        "true_issued": ["2026-01-02", "2026-02-03", "2026-03-04", "2026-04-05"],  # text truth, date field
        "vendor": ["Acme", "acme", None, "Globex"],
        "true_vendor": ["Acme", "Acme", "Initech", "Globex"],
    })
    q = extraction_quality(results, {"total": "true_total", "issued": "true_issued", "vendor": "true_vendor"})
    f = q["fields"]
    assert (f["total"]["compared"], f["total"]["matched"]) == (3, 1)
    assert (f["issued"]["compared"], f["issued"]["matched"]) == (4, 3)
    assert (f["vendor"]["compared"], f["vendor"]["matched"]) == (4, 2)  # exact: case matters
    assert f["issued"]["exact_match_rate"] == 0.75
    assert q["mean_exact_match_rate"] == pytest.approx((1 / 3 + 0.75 + 0.5) / 3, abs=1e-6)


def _summary_data(**changes) -> dict:
    data = dict(
        run_id="r1", job="ticket_triage", job_spec="conf/jobs/ticket_triage.yaml", engine="cpu-smollm2",
        model="SmolLM2-135M-Instruct", lora=None, started_at="2026-11-30T00:00:00+00:00",
        finished_at="2026-11-30T00:01:00+00:00", wall_s=60.0, task="generate", resumed=False, shards_redone=1,
        records_in=3, records_out=2, records_ok=2, records_rejected=1, records_failed=1, distinct_ids=2,
        duplicate_ids=0, prompt_tokens=200, completion_tokens=20, cached_prompt_tokens=0, work_units=0.0,
        cost_usd=0.001, compute_usd=0.0, overhead_usd=0.0, records_cached=0, cached_records_prompt_tokens=0,
        cached_records_cached_prompt_tokens=0, cached_records_completion_tokens=0, errors_by_kind={"empty_input": 1},
        records_per_s=None, output_tokens_per_s=None, engine_start_s=None, engine_replicas=1, engine_dtype="float32",
        steady_output_tokens_per_s=None, cost={"mode": "per_token", "total_usd": 0.001}, cache=None, price={},
        input={"path": "in/", "format": "parquet", "shards": 1,
               "quarantined": [{"path": "in/bad.parquet", "reason": "unreadable", "message": "truncated"}]},
        output={"path": "out/r1", "format": "parquet", "results": ["out/r1/results/a/0.parquet"], "rejects": []},
        hosted_comparison={})
    data.update(changes)
    return data


def test_the_summary_round_trips_and_a_newer_or_damaged_one_is_refused_by_name(tmp_path):
    import json

    import fsspec

    from pipelines.errors import ConfigError
    from pipelines.run.summary import SUMMARY_SCHEMA_VERSION, RunSummary, read_summary, write_summary

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    assert read_summary(fs, root) is None
    summary = RunSummary.model_validate(_summary_data())
    write_summary(fs, root, summary)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["schema_version"] == SUMMARY_SCHEMA_VERSION and written["output"]["output_file"] is None
    again = read_summary(fs, root)
    assert again == summary and again.input.quarantined[0].reason == "unreadable"

    (tmp_path / "summary.json").write_text(json.dumps({**written, "schema_version": SUMMARY_SCHEMA_VERSION + 1}))
    with pytest.raises(ConfigError, match=r"summary\.json: written by a newer tokenmill"):
        read_summary(fs, root)
    del written["records_ok"]
    (tmp_path / "summary.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError, match=r"summary\.json: not a valid run summary: records_ok: Field required"):
        read_summary(fs, root)
    with pytest.raises(Exception, match="extra"):  # a misspelt key is refused, not kept beside the right one
        RunSummary.model_validate(_summary_data(record_ok=2))
