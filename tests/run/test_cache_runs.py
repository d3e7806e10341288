"""The response cache on the real engine: repeats within a run are generated once, a second run is answered
from the cache with the same results, costs nothing for those answers, and never starts the engine."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START

from pipelines.config.load import load_job
from pipelines.run.ledger import read_ledger
from pipelines.run.runner import run_job
from pipelines.run.summary import RunSummary

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/review_sentiment.yaml"
CACHE_DIFFERS = {"cached", "cost_usd", "compute_usd", "overhead_usd", "work_units", "run_id"}


def _input(folder: Path) -> pa.Table:
    """32 reviews, then 8 more whose text repeats earlier ones under new ids, in two shards."""
    table = pq.read_table(REPO / "data/samples/reviews").slice(0, 32)
    repeats = table.slice(0, 8).to_pylist()
    for k, row in enumerate(repeats):
        row["review_id"] = f"REPEAT-{k}"
    table = pa.concat_tables([table, pa.Table.from_pylist(repeats, schema=table.schema)])
    folder.mkdir()
    pq.write_table(table.slice(0, 20), folder / "part-0.parquet")
    pq.write_table(table.slice(20), folder / "part-1.parquet")
    return table


def _results(summary: RunSummary) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in summary.output.results]).sort("review_id")


@pytest.mark.engine
def test_a_second_run_is_answered_from_the_cache(ray_cluster, model_path, tmp_path):
    _input(tmp_path / "in")
    job = load_job(JOB, overrides=[f"input.path={tmp_path / 'in'}", f"output.path={tmp_path / 'out'}",
                                   f"cache.path={tmp_path / 'cache'}", "cost.mode=accelerator_time",
                                   "sampling.max_tokens=4"], engine_overrides=QUICK_START)
    first = run_job(job, run_id="first", progress=False)
    one = _results(first)
    assert one.height == 40 and one["error"].null_count() == 40
    # Repeats within the run: generated once; the other of each pair (whichever batch came second) is a copy,
    # marked, and free.
    assert one["cached"].sum() == 8 and first.cache["records"] == 8
    ledger = read_ledger(*_fs(tmp_path / "out" / "first"))
    assert sum(e["rows"] for e in ledger) == 32, "the engine must see each distinct prompt once"
    by_id = {r["review_id"]: r for r in one.iter_rows(named=True)}
    originals = pq.read_table(REPO / "data/samples/reviews").column("review_id").to_pylist()[:8]
    for k, original_id in enumerate(originals):
        pair = sorted([by_id[f"REPEAT-{k}"], by_id[original_id]], key=lambda r: r["cached"])
        generated, copied = pair
        assert (generated["cached"], copied["cached"]) == (False, True)
        assert (copied["label"], copied["output_text"], copied["completion_tokens"]) == \
            (generated["label"], generated["output_text"], generated["completion_tokens"])
        assert copied["cost_usd"] == 0.0 and generated["cost_usd"] > 0
    # The bill still adds up: the generated records carry all of it.
    assert one["cost_usd"].sum() == pytest.approx(first.cost["total_usd"], rel=1e-3)

    second = run_job(job, run_id="second", progress=False)
    two = _results(second)
    assert two["cached"].to_list() == [True] * 40 and second.cache["records"] == 40
    same = [c for c in one.columns if c not in CACHE_DIFFERS]
    assert two.select(same).equals(one.select(same)), "answers from the cache must be the first run's"
    assert second.cache["saved_usd"] > 0
    # Nothing to generate: the engine never started, and the replica's short time, from its creation to the
    # pool's shutdown, is all the run paid: no busy time, no engine start-up.
    assert second.engine_start_s is None
    assert second.cost["compute_usd"] == 0 and second.cost["startup_usd"] == 0, second.cost
    assert 0 < second.cost["total_usd"] < first.cost["total_usd"] / 2
    assert two["cost_usd"].sum() == pytest.approx(second.cost["total_usd"], rel=1e-3)
    saved = json.loads((tmp_path / "out" / "second" / "summary.json").read_text())["cache"]
    assert saved["records"] == 40 and saved["path"] == str(tmp_path / "cache")


def _fs(path: Path):
    import fsspec

    return fsspec.filesystem("file"), str(path)
