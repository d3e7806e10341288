"""`tokenmill bench throughput` runs every side on the same prompts and reports their ratios (figures, not a timed
test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main

JOB = Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml"


@pytest.mark.engine
def test_throughput_compares_raw_vllm_the_pipeline_both_ways_ray_data_llm_and_transformers(ray_cluster, model_path,
                                                                                          tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "throughput", str(JOB), "--rows", "24", "--max-tokens", "8", "--transformers-rows", "8",
                 "--sides", "raw,pipeline,pipeline_cluster,ray_data_llm,transformers", *QUICK_START_ARGS,
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pipeline/raw:" in printed and "pipeline cluster/raw:" in printed
    assert "with startup pipeline/ray data llm:" in printed and "pipeline, own cluster: 1 batches" in printed
    figures = json.loads(out.read_text())
    sides = figures["runs"][0]["sides"]
    assert set(sides) == {"raw", "pipeline", "pipeline_cluster", "ray_data_llm", "transformers"}
    # The test session's cluster is running in this process: the joined side joined it.
    assert figures["cluster"] == "the cluster this process is connected to"
    # ignore_eos: every side generates exactly rows x max_tokens tokens for the same prompts.
    for side in ("raw", "pipeline", "pipeline_cluster", "ray_data_llm"):
        assert sides[side]["output_tokens"] == 24 * 8 and sides[side]["requests"] == 24, side
        assert sides[side]["with_startup_output_tokens_per_s"] > 0 and sides[side]["driver_peak_rss_mb"] > 0, side
    # ray.data.llm has no steady-state figure (nothing outside its processor says when its engine was ready).
    assert sides["ray_data_llm"]["output_tokens_per_s"] is None and sides["raw"]["output_tokens_per_s"] > 0
    # ray.data.llm built the messages and tokenized them itself: the engine still got the same prompts.
    assert sides["raw"]["prompt_tokens"] > 24 * 10
    assert (sides["pipeline"]["prompt_tokens"] == sides["pipeline_cluster"]["prompt_tokens"]
            == sides["raw"]["prompt_tokens"] == sides["ray_data_llm"]["prompt_tokens"])
    assert "WARNING" not in printed
    assert sides["transformers"]["output_tokens"] == 8 * 8
    for side in ("pipeline", "pipeline_cluster"):
        # The engine core inside the actor (QUICK_START_ARGS): its memory is the actor's (the shared review run
        # checks the default, a process of its own, in tests/run/test_cost_report.py).
        assert sides[side]["actor_peak_rss_mb"] > 1000 and sides[side]["engine_peak_rss_mb"] is None
        assert sides[side]["profile"]["batches"] >= 1
    # A driver that starts its own cluster owns Ray's processes; one that joins a cluster owns none of them.
    assert sides["pipeline"]["profile"]["ray_cpu_s"] and not sides["pipeline_cluster"]["profile"]["ray_cpu_s"]
    for side in ("pipeline", "pipeline_cluster"):
        # From the sides' own counts and seconds, not from the rates the ratio was made of.
        ratio = (sides[side]["output_tokens"] / sides[side]["steady_s"]) / (24 * 8 / sides["raw"]["steady_s"])
        assert figures["median"][f"ratio_{side}_to_raw"] == pytest.approx(ratio)
    assert "ratio_pipeline_to_ray_data_llm" not in figures["median"]
    assert figures["median"]["ratio_with_startup_pipeline_to_ray_data_llm"] == pytest.approx(
        sides["pipeline"]["with_startup_output_tokens_per_s"] / sides["ray_data_llm"]["with_startup_output_tokens_per_s"])
    assert figures["dtype"] in ("bfloat16", "float32") and f"({figures['dtype']})" in printed


def _side(tokens: int, steady_s: float | None, wall_s: float | None = None, start_s: float | None = 10.0):
    from pipelines.bench.throughput import SideFigures

    return SideFigures(requests=tokens // 8, output_tokens=tokens, prompt_tokens=1000, wall_s=wall_s, steady_s=steady_s,
                       engine_start_s=start_s, driver_peak_rss_mb=500.0)


def test_ratios_compare_steady_state_where_both_sides_have_it_and_wall_to_wall_otherwise():
    from pipelines.bench.throughput import ratios

    got = ratios({"raw": _side(800, 8.0), "pipeline": _side(800, 10.0, wall_s=25.0),
                  "pipeline_cluster": _side(800, 16.0, wall_s=30.0), "ray_data_llm": _side(800, None, wall_s=40.0)})
    assert got["ratio_pipeline_to_raw"] == pytest.approx(0.8)  # 80 against 100 tokens/s
    assert got["ratio_pipeline_cluster_to_raw"] == pytest.approx(0.5)
    assert got["ratio_with_startup_pipeline_to_raw"] == pytest.approx((800 / 25) / (800 / 18))  # raw: start + steady
    assert got["ratio_with_startup_pipeline_to_ray_data_llm"] == pytest.approx(40 / 25)
    assert "ratio_ray_data_llm_to_raw" not in got  # no steady state to compare
    assert ratios({"pipeline": _side(800, 10.0)}) == {}  # nothing to compare against


def test_the_median_of_three_runs_is_the_middle_one_and_of_two_their_mean():
    from pipelines.bench.common import median

    assert median([0.97, 0.91, 0.95]) == 0.95
    assert median([0.9, 1.0]) == pytest.approx(0.95)
