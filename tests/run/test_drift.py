"""Drift gates between nights (`pipelines.run.drift`): the comparison, and nights run on the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.config.job import GatesSpec
from pipelines.run.drift import compare, label_psi
from pipelines.run.summary import RunSummary

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/review_sentiment.yaml"


def test_population_stability_index():
    assert label_psi({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0
    # 50/50 to 90/10: (0.9-0.5)ln(0.9/0.5) + (0.1-0.5)ln(0.1/0.5)
    assert label_psi({"a": 50, "b": 50}, {"a": 90, "b": 10}) == pytest.approx(0.8789, abs=1e-4)
    # A label new tonight counts, floored rather than infinite.
    assert 0 < label_psi({"a": 100}, {"a": 99, "b": 1}) < 0.1
    assert label_psi({}, {"a": 1}) is None


def test_each_gate_trips_on_its_own_figure_and_only_past_its_limit(review_run):
    night = RunSummary.model_validate(review_run.summary)
    same = compare(night, night, GatesSpec(label_psi_max=0, fill_rate_drop_max=0, exact_match_drop_max=0,
                                           parse_error_rate_rise_max=0, reject_rate_rise_max=0,
                                           tokens_per_record_change_max=0, cost_per_1k_change_max=0),
                   previous_run="reviews")
    assert same.status == "passed" and same.gated and not same.breaches
    metrics = {c.metric for c in same.comparisons}
    assert {"label_psi", "fill_rate:label", "exact_match:label", "parse_error_rate", "reject_rate",
            "tokens_per_record", "cost_per_1k_records_usd"} <= metrics

    labels = dict(night.by_label or {})
    top = max(labels, key=lambda k: labels[k]["records"])
    shifted = night.model_copy(update={
        "by_label": {**labels, top: {**labels[top], "records": labels[top]["records"] * 4}},
        "records_rejected": night.records_rejected + 10,
        "cost_usd": night.cost_usd * 1.5,
    })
    gates = GatesSpec(label_psi_max=0.1, reject_rate_rise_max=0.05, cost_per_1k_change_max=0.4)
    drift = compare(shifted, night, gates, previous_run="reviews")
    assert drift.status == "gate_failed"
    assert {c.metric for c in drift.breaches} == {"label_psi", "reject_rate", "cost_per_1k_records_usd"}
    cost = next(c for c in drift.comparisons if c.metric == "cost_per_1k_records_usd")
    assert cost.change == pytest.approx(0.5, rel=1e-3) and cost.watch == "either"
    # The same shift on nights smaller than gates.min_records is reported, not gated.
    small = compare(shifted, night, gates.model_copy(update={"min_records": 10_000}), previous_run="reviews")
    assert small.status == "passed" and not small.gated and small.comparisons == [
        c.model_copy(update={"breached": False}) for c in drift.comparisons]
    assert compare(night, None, gates).status == "not_compared"


@pytest.mark.engine
def test_an_unshifted_night_passes_and_a_shifted_one_trips_the_gate(review_run, tmp_path, capsys):
    """Night 1 is the shared review run; night 2 is the same reviews again (on vLLM, filling a response cache);
    night 3 holds only the negative reviews (answered from that cache). Both later nights go under night 1's
    output path, so each compares with the one before it."""
    reviews = review_run.input
    negative = reviews.filter(pc.equal(reviews["true_sentiment"], "negative"))
    for folder, table in (("night2", reviews), ("night3", negative)):
        (tmp_path / folder).mkdir()
        pq.write_table(table, tmp_path / folder / "part-0.parquet")
    assert negative.num_rows >= 20

    def night(folder: str, run_id: str) -> tuple[int, dict, str]:
        capsys.readouterr()
        code = main(["run", str(JOB), *review_run.sets, "--set", f"input.path={tmp_path / folder}",
                     "--set", f"cache.path={tmp_path / 'cache'}", "--set", "gates.label_psi_max=0.1",
                     "--set", "gates.fill_rate_drop_max=0.1", "--run-id", run_id, "--no-progress",
                     *QUICK_START_ARGS])
        out = capsys.readouterr()
        run_dir = review_run.root / "out" / run_id
        return code, json.loads((run_dir / "summary.json").read_text()), out.out + out.err

    code, second, printed = night("night2", "reviews-night2")
    assert code == 0, printed[-3000:]
    drift = second["drift"]
    assert drift["previous_run"] == "reviews" and drift["status"] == "passed" and drift["gated"]
    psi2 = next(c for c in drift["comparisons"] if c["metric"] == "label_psi")["change"]
    assert json.loads((review_run.root / "out/reviews-night2/_SUCCESS").read_text())["gates"] == "passed"

    code, third, printed = night("night3", "reviews-night3")
    psi3 = next(c for c in third["drift"]["comparisons"] if c["metric"] == "label_psi")["change"]
    with capsys.disabled():
        print(f"\ndrift: unshifted night PSI {psi2:.4f} (passed), negative-only night PSI {psi3:.4f}")
    assert code == 8, printed[-3000:]
    assert third["records_cached"] == third["records_out"]  # night 3 needed no engine
    assert third["drift"]["previous_run"] == "reviews-night2" and third["drift"]["status"] == "gate_failed"
    assert "label_psi" in {c["metric"] for c in third["drift"]["comparisons"] if c["breached"]}
    assert "drift gate(s) breached against reviews-night2: label_psi" in printed
    # Committed and kept, marked as such, and not a baseline for the next night.
    night3 = review_run.root / "out/reviews-night3"
    assert json.loads((night3 / "_SUCCESS").read_text())["gates"] == "gate_failed"
    assert third["records_in"] == negative.num_rows and list((night3 / "results").rglob("*.parquet"))
    assert "Against the previous night" in (night3 / "report.html").read_text()
    # Run again (a scheduler's retry): the finished run is found, and still fails its gate.
    code, _, _ = night("night3", "reviews-night3")
    assert code == 8
