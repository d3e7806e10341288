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
