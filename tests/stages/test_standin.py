"""The stand-in engine (`backend: stand-in`): deterministic answers without a model, through the real generate
stage and, on a real Ray cluster, the whole pipeline. What it is for: tests of everything around the engine."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.config import load_job
from pipelines.run.commit import read_success
from pipelines.run.summary import SUMMARY_SCHEMA_VERSION
from pipelines.stages.standin import REFUSE

REPO = Path(__file__).resolve().parents[2]


def test_answers_are_a_function_of_the_prompt_and_honour_the_constraint(model_path):
    from pipelines.config.job import SamplingSpec
    from pipelines.models import resolve_engine_paths
    from pipelines.stages.standin import StandInEngine

    profile = load_job(REPO / "conf/jobs/ticket_triage.yaml", overrides=["engine=stand-in"]).engine
    _, tokenizer = resolve_engine_paths(profile.model, profile.tokenizer)
    ready = []
    engine = StandInEngine(profile, model_path="", tokenizer_path=tokenizer, extra={}, lora_request=None,
                           on_ready=lambda s, dtype: ready.append((s, dtype)))
    sampling_params = engine.sampling_params
    free = sampling_params(SamplingSpec(max_tokens=3))
    labels = sampling_params(SamplingSpec(max_tokens=8), structured={"choice": ["billing", "technical"]})
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "day": {"type": "string", "format": "date"}},
              "required": ["total", "day"]}
    typed = sampling_params(SamplingSpec(max_tokens=64), structured={"json": schema})
    done, failed = engine.generate([[1, 2], [1, 2], [3], [4]], [free, free, labels, typed])
    assert failed == {} and ready == [(0.0, "stand-in")]
    assert done[0].outputs[0].text == done[1].outputs[0].text  # the same prompt, the same answer
    assert len(done[0].outputs[0].token_ids) == 3 and done[0].outputs[0].finish_reason == "length"
    assert done[2].outputs[0].text in ("billing", "technical")
    assert json.loads(done[3].outputs[0].text) == {"total": 1.5, "day": "2026-01-01"}
    refused_ids = engine.encode(f"please {REFUSE} this")
    done, failed = engine.generate([[5], refused_ids], [free, free])
    assert set(done) == {0} and failed[1].startswith("ValueError: the stand-in engine refuses")


@pytest.mark.parametrize("task_job", ["review_sentiment", "invoice_fields"])
def test_a_whole_run_on_the_stand_in_engine(task_job, ray_cluster, model_path, tmp_path, capsys):
    """The real pipeline on a real Ray cluster, engine aside: every record answered, typed and committed."""
    samples = {"review_sentiment": "reviews", "invoice_fields": "invoices"}[task_job]
    table = pq.read_table(sorted((REPO / "data/samples" / samples).glob("*.parquet"))[0]).slice(0, 12)
    prompt_column = {"review_sentiment": "text", "invoice_fields": "email"}[task_job]
    texts = table.column(prompt_column).to_pylist()
    texts[5] = f"{texts[5]} {REFUSE}"
    table = table.set_column(table.schema.get_field_index(prompt_column), prompt_column, pa.array(texts))
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in/part-0.parquet")
    args = ["run", str(REPO / f"conf/jobs/{task_job}.yaml"), "--set", "engine=stand-in", "--no-progress",
            "--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}", "--json"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    summary = json.loads(capsys.readouterr().out)
    assert summary["records_in"] == 12 and summary["engine_dtype"] == "stand-in" and summary["model"] == "stand-in"
    assert summary["schema_version"] == SUMMARY_SCHEMA_VERSION
    assert (summary["by_label"] is None) == (task_job == "invoice_fields")  # a section without figures is null
    success = read_success(fsspec.filesystem("file"), summary["output"]["path"])
    assert (success.records_in, success.results, success.rejects) == (
        12, summary["output"]["results"], summary["output"]["rejects"])
    assert summary["records_rejected"] == 1 and summary["errors_by_kind"] == {"engine": 1}
    results = pl.concat([pl.read_parquet(f) for f in summary["output"]["results"]])
    rejects = pl.concat([pl.read_parquet(f) for f in summary["output"]["rejects"]])
    assert results.height == 11 and rejects["reason"].to_list() == ["engine"]
    assert results["error_code"].null_count() == 11 and results["cost_usd"].sum() > 0
    if task_job == "review_sentiment":
        assert set(results["label"].to_list()) <= {"positive", "negative", "neutral"}
    else:
        assert set(results["total"].to_list()) == {1.5}
