"""`tokenmill bench` runs both sides on the same prompts and reports their ratio (figures, not a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main

JOB = Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml"


@pytest.mark.engine
def test_bench_compares_raw_vllm_the_pipeline_ray_data_llm_and_transformers(ray_cluster, model_path, tmp_path,
                                                                            capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(JOB), "--rows", "24", "--max-tokens", "8", "--transformers-rows", "8",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pipeline/raw:" in printed and "with startup pipeline/ray data llm:" in printed and "pipeline profile:" in printed
    figures = json.loads(out.read_text())
    sides = figures["runs"][0]["sides"]
    assert set(sides) == {"raw", "pipeline", "ray_data_llm", "transformers"}
    # ignore_eos: every side generates exactly rows x max_tokens tokens for the same prompts.
    for side in ("raw", "pipeline", "ray_data_llm"):
        assert sides[side]["output_tokens"] == 24 * 8 and sides[side]["requests"] == 24, side
        assert sides[side]["with_startup_output_tokens_per_s"] > 0 and sides[side]["driver_peak_rss_mb"] > 0, side
    # ray.data.llm has no steady-state figure (nothing outside its processor says when its engine was ready).
    assert sides["ray_data_llm"]["output_tokens_per_s"] is None and sides["raw"]["output_tokens_per_s"] > 0
    # ray.data.llm built the messages and tokenized them itself: the engine still got the same prompts.
    assert sides["raw"]["prompt_tokens"] > 24 * 10
    assert sides["pipeline"]["prompt_tokens"] == sides["raw"]["prompt_tokens"] == sides["ray_data_llm"]["prompt_tokens"]
    assert "WARNING" not in printed
    assert sides["transformers"]["output_tokens"] == 8 * 8
    assert sides["pipeline"]["actor_peak_rss_mb"] > 0 and sides["pipeline"]["engine_peak_rss_mb"] > 0
    ratio = sides["pipeline"]["output_tokens_per_s"] / sides["raw"]["output_tokens_per_s"]
    assert figures["median"]["ratio_pipeline_to_raw"] == pytest.approx(ratio)
    assert "ratio_pipeline_to_ray_data_llm" not in figures["median"]
    assert figures["median"]["ratio_with_startup_pipeline_to_ray_data_llm"] == pytest.approx(
        sides["pipeline"]["with_startup_output_tokens_per_s"] / sides["ray_data_llm"]["with_startup_output_tokens_per_s"])


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
