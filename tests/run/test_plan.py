"""`tokenmill plan` against a deadline: time-of-day deadlines, published priors for uncalibrated profiles, the
cluster's capacity, calibrations that belong to another machine, and the plan checked against a real run."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pipelines.bench.calibrate import format_calibration
from pipelines.cli import main
from pipelines.cli.app import deadline_seconds, format_summary
from pipelines.config.load import load_engine, load_job
from pipelines.errors import ConfigError
from pipelines.run.plan import cluster_capacity, profile_estimate, throughput_basis
from pipelines.run.report import render_html
from pipelines.run.summary import RunSummary

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


def test_a_deadline_is_a_time_of_day_after_the_start_or_a_duration():
    assert deadline_seconds("06:00", "22:00") == 8 * 3600
    assert deadline_seconds("23:30", "22:00") == 5400
    assert deadline_seconds("90m", None) == 5400
    now = dt.datetime(2026, 11, 30, 5, 0, tzinfo=dt.timezone.utc)
    assert deadline_seconds("06:00", None, now=now) == 3600
    with pytest.raises(ConfigError, match="--deadline '6 am:': expected a time of day as HH:MM"):
        deadline_seconds("6 am:", None)
    with pytest.raises(ConfigError, match="--start goes with a --deadline time of day"):
        deadline_seconds("90m", "22:00")


def test_the_kuberay_manifests_say_how_many_replicas_each_profile_can_have():
    capacity = cluster_capacity(REPO / "infra/k8s")
    assert capacity["llama4-scout-h100"] == {"manifest": "raycluster-llama4-scout-h100.yaml",
                                             "cluster": "tokenmill-llama4-scout-h100", "max_replicas": 4}
    assert set(capacity) == {"llama4-scout-h100", "llama4-maverick-h200"}


def test_uncalibrated_llama4_profiles_are_planned_from_a_named_dated_figure(capsys):
    """The Llama 4 profiles have no calibration: their estimates come from published figures, said so beside each
    estimate, with the cluster's capacity for the deadline."""
    assert main(["plan", str(CONF / "jobs/ticket_triage.yaml"), "--sample", "64", "--deadline", "06:00",
                 "--start", "05:00", "--set", "engine=cpu-smollm2"]) == 0
    printed = capsys.readouterr().out
    for name in ("llama4-scout-h100", "llama4-maverick-h200"):
        line = next(i for i, t in enumerate(printed.splitlines()) if t.strip().startswith(name))
        shown = printed.splitlines()[line:line + 2]
        assert "replica(s)" in shown[0] and "of tokenmill-" + name in shown[0], shown
        assert "published figure, not calibrated" in shown[1] and "taken 2026-11-30" in shown[1], shown
    no_figure = [t.split()[0] for t in printed.splitlines() if "no measured throughput" in t]
    assert no_figure == ["cpu-tiny-llama4"]  # random weights: nothing to calibrate
    job = load_job(CONF / "jobs/ticket_triage.yaml")
    maverick = load_engine("llama4-maverick-h200", CONF)
    # A night of 100M records by 06:00 from 22:00 needs more replicas than the cluster's worker group holds.
    big = profile_estimate(maverick, None, prompt=100_000_000 * 300, cached=0, output=100_000_000 * 8,
                           deadline_s=8 * 3600, capacity={"manifest": "m", "cluster": "c", "max_replicas": 4})
    assert big["replicas"] > 4 and big["fits_cluster"] is False and "TensorRT-LLM" in big["basis"]
    assert job.engine.name == "cpu-smollm2"


def test_a_calibration_from_another_machine_is_said_to_be_one():
    profile = load_engine("cpu-smollm2", CONF)
    _, basis, warning = throughput_basis(profile, machine=profile.cost.throughput.machine)
    assert basis.startswith("calibrated: tokenmill bench calibrate") and warning is None
    _, _, warning = throughput_basis(profile, machine="Intel Xeon Platinum 8480+, 2 cores, AVX-512, native bf16")
    assert warning.startswith("calibrated on another machine (AMD EPYC, 2 cores, AVX2, no native bf16; this one is "
                              "Intel Xeon Platinum 8480+")


def test_a_first_night_is_planned_from_the_jobs_measured_output_figure(tmp_path, model_path):
    """With no earlier run, free text has only max_tokens to go by, an upper bound, unless the job spec carries the
    figure `tokenmill bench calibrate` measured; a figure above this run's max_tokens is held to it."""
    def plan(*sets: str) -> dict:
        out = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.json"
        args = ["--set", f"output.path={tmp_path / 'out'}", *[a for kv in sets for a in ("--set", kv)]]
        assert main(["plan", str(CONF / "jobs/ticket_triage.yaml"), "--sample", "32", *args, "--json", str(out)]) == 0
        return json.loads(out.read_text())["output_tokens"]

    bound = plan("plan.output_tokens_per_record=null")
    assert bound["basis"].startswith("sampling.max_tokens, an upper bound") and bound["mean_per_record"] == 48
    measured = plan("plan.output_tokens_per_record=31.5", "plan.measured=calibrated here")
    assert measured["mean_per_record"] == 31.5 and measured["total"] == round(31.5 * 300)
    assert measured["basis"] == "the job spec's plan.output_tokens_per_record, measured: calibrated here"
    assert plan("plan.output_tokens_per_record=31.5", "sampling.max_tokens=16")["mean_per_record"] == 16
    assert load_job(CONF / "jobs/ticket_triage.yaml").spec.plan.measured.startswith("tokenmill bench calibrate")


def test_calibration_prints_the_jobs_plan_section():
    r = {"engine": "cpu-smollm2", "rows": 256, "job": "ticket_triage", "prompt_tokens": 25_600, "engine_start_s": 9.0,
         "passes": {k: {"seconds": 1.0, "cached_tokens": 0} for k in ("prefill", "again", "decode", "cold", "warm")},
         "work_per_s": 500.0, "block_size": 128, "decode_tokens": 32, "decode_weight": 2.5, "cached_weight": 0.01,
         "pipeline": {"records": 256, "replica_s": 80.0, "busy_s": 44.0, "engine_start_s": 9.0,
                      "completion_tokens": 10_112},
         "startup_s": 36.0, "pipeline_work_per_s": 466.0, "measured": "m", "machine": "here",
         "output_tokens_per_record": 10_112 / 256, "job_measured": "m, on cpu-smollm2 with max_tokens 48"}
    printed = format_calibration(r).splitlines()
    at = printed.index("    plan:")
    assert printed[at - 1] == "  for the job spec's plan: section (10,112 output tokens over 256 records):"
    assert printed[at + 1:] == ["      output_tokens_per_record: 39.5",
                                "      measured: m, on cpu-smollm2 with max_tokens 48"]


@pytest.mark.engine
def test_every_run_checks_the_plan_against_what_it_did(review_run, capsys):
    """The shared review run (vLLM, accelerator time) kept the plan its start made from a sample, and each
    figure's error."""
    check = review_run.summary["plan_check"]
    assert set(check) == {"records", "prompt_tokens", "output_tokens", "wall_s", "cost_usd"}
    # (The sample's plan does not look for repeated ids: the one repeat here counts as a record to generate.)
    assert check["records"]["actual"] == 80 and check["records"]["estimate"] == 81
    assert all(v["error_pct"] is not None for v in check.values()), check
    with capsys.disabled():
        print("\nplan against run (review_sentiment, vLLM): "
              + ", ".join(f"{k} {v['error_pct']:+.1f}%" for k, v in check.items()))
    # (The run's own report.html may since have been rebuilt by test_cost_report, without it: render it again.)
    assert "The plan against the run" in render_html(RunSummary.model_validate(review_run.summary), None)
    # Where the profile's calibration is another machine's, the run says so beside the plan's errors.
    _, _, warning = throughput_basis(load_engine("cpu-smollm2", CONF))
    assert review_run.summary["plan_warning"] == warning
    told = RunSummary.model_validate({**review_run.summary, "plan_warning": "calibrated on another machine (X)"})
    assert "The plan's wall time and cost: calibrated on another machine (X)" in render_html(told, None)
    assert "(the plan's wall time and cost: calibrated on another machine (X))" in format_summary(told)
