"""Prefix-friendly batching on the real engine: records sharing a long prefix hit vLLM's prefix cache."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START

from pipelines.config.load import load_job
from pipelines.run.runner import run_job

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
# Three KV blocks of the CPU engine (128 tokens each) and more, after a channel name that differs early.
POLICY = " ".join(["Follow the routing policy: read the whole ticket, weigh the customer's words, "
                   "and name exactly one team."] * 20)


@pytest.mark.engine
def test_records_sharing_a_long_prefix_are_served_from_the_prefix_cache(ray_cluster, model_path, tmp_path):
    tickets = pq.read_table(REPO / "data/samples/tickets")
    # 8 tickets of each of 3 channels, interleaved, so that input order alone would not group them.
    by_channel = {c: tickets.filter(pa.compute.equal(tickets["channel"], c)).slice(0, 8)
                  for c in ("email", "chat", "web_form")}
    rows = [t for k in range(8) for t in (by_channel[c].slice(k, 1) for c in by_channel)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.concat_tables(rows), tmp_path / "in" / "part-0.parquet")
    job = load_job(JOB, overrides=[
        f"input.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}", "sampling.max_tokens=2",
        f"prompt.system=Channel {{channel}}. {POLICY}"], engine_overrides=QUICK_START)
    summary = run_job(job, run_id="prefix", progress=False)
    results = pl.concat([pl.read_parquet(f) for f in summary.output.results])
    assert results.height == 24 and results["error"].null_count() == 24
    assert results["prompt_tokens"].min() > 2 * 128
    hits = results.filter(pl.col("cached_prompt_tokens") >= 2 * 128)
    # One record per channel computes the shared blocks; all 21 others are sent after it and reuse them
    # (in input order, with the engine's 4,096-token steps, about half would be admitted alongside their
    # group's first and miss).
    assert hits.height == 21, results.select("channel", "cached_prompt_tokens").to_dicts()
    assert summary.cached_prompt_tokens >= 21 * 2 * 128
