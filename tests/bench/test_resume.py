"""`tokenmill bench resume`: resuming a finished run costs no engine work.

On the stand-in engine: what the bench measures is the driver's resume, which never reaches the engine; the
figures on vLLM are in docs/benchmarks.md."""

from __future__ import annotations

import json

from pipelines.cli import main


def test_resume_bench_shows_a_finished_run_costs_no_engine_work(ray_cluster, model_path, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "resume", "--rows", "16", "--set", "sampling.max_tokens=4", "--set", "engine=stand-in",
                 "--json", str(out)]) == 0
    assert "0 shards redone" in capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["first_run_engine_replicas"] == 1 and figures["resume_shards_redone"] == 0
    assert figures["ratio_resume_to_first"] < 0.5  # the first run starts an engine; the resume reads two small files
