"""`tokenmill bench` runs both sides on the same prompts and reports their ratio (figures, not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main

JOB = Path(__file__).resolve().parents[1] / "conf/jobs/ticket_triage.yaml"


@pytest.mark.engine
def test_bench_compares_raw_vllm_and_pipeline(ray_cluster, model_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(JOB), "--rows", "40", "--max-tokens", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio pipeline/raw at steady state" in printed
    figures = json.loads(out.read_text())
    # ignore_eos: both sides generate exactly rows x max_tokens tokens for the same prompts.
    assert figures["raw_vllm"]["output_tokens"] == figures["pipeline"]["output_tokens"] == 40 * 8
    assert figures["raw_vllm"]["requests"] == figures["pipeline"]["requests"] == 40
    assert figures["raw_vllm"]["output_tokens_per_s"] > 0 and figures["pipeline"]["output_tokens_per_s"] > 0
    ratio = figures["pipeline"]["output_tokens_per_s"] / figures["raw_vllm"]["output_tokens_per_s"]
    assert figures["ratio_pipeline_to_raw"] == pytest.approx(ratio)


@pytest.mark.engine
def test_task_bench_compares_constrained_and_unconstrained_decoding(model_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--task", "classify", "--rows", "12", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ratio constrained/unconstrained, requests/s" in printed
    figures = json.loads(out.read_text())
    u, c = figures["unconstrained"], figures["constrained"]
    assert u["requests"] == c["requests"] == 12
    assert c["valid_share"] == 1.0, "constrained decoding must always give one of the labels"
    assert figures["ratio_requests_per_s"] == pytest.approx(c["requests_per_s"] / u["requests_per_s"])


@pytest.mark.engine
def test_resume_bench_shows_a_finished_run_costs_no_engine_work(ray_cluster, model_path, capsys):
    assert main(["bench", "--resume", "--rows", "16", "--set", "sampling.max_tokens=4"]) == 0
    printed = capsys.readouterr().out
    assert "0 shards redone" in printed
    ratio = float(printed.split("ratio resume/first run:")[1].split()[0])
    assert ratio < 0.5  # the first run starts an engine; the resume reads two small JSON files
