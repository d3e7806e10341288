"""`tokenmill rejects replay`: refusals by reason, and engine rejects answered by vLLM once their cause is gone."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.stages.standin import REFUSE

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"


@pytest.mark.parametrize(("args", "said"), [
    ([], "nothing to replay: the run's rejects are duplicate_id (1), empty_input (1); only engine, image, "
         "prompt_too_long can succeed on another try"),
    (["--reasons", "null_id"], "--reasons: null_id cannot be replayed: its id is null, so the same record would be "
                               "rejected again"),
    (["--reasons", "empty_input,engine"], "--reasons: empty_input cannot be replayed: its prompt columns are empty"),
    (["--reasons", "bogus"], "--reasons: 'bogus' is not a reason"),
    (["--reasons", "engine"], "nothing to replay: the run has no rejects for engine"),
])
def test_reasons_that_can_never_succeed_are_refused_by_name(review_run, args, said, capsys):
    assert main(["rejects", "replay", str(review_run.run_dir), *args]) == 2
    assert said in capsys.readouterr().err


def test_a_shard_gone_since_the_run_is_named_and_nothing_is_staged(tmp_path):
    import fsspec

    from pipelines.config.storage import StorageOptions
    from pipelines.errors import InputError
    from pipelines.run.replay import ReplayRows, stage

    gone = str(tmp_path / "in/part-0.parquet")
    rows = ReplayRows(rows=pl.DataFrame({"shard": [gone], "row": [3], "id": ["T3"], "reason": ["engine"]}),
                      reasons=("engine",))
    with pytest.raises(InputError, match=f"{gone}: the shard the rejected rows came from cannot be read"):
        stage(rows, ["ticket_id"], StorageOptions(), fsspec.filesystem("file"), str(tmp_path / "staged"))
    assert list((tmp_path / "staged").glob("*.parquet")) == []


@pytest.mark.engine
def test_engine_rejects_are_replayed_on_vllm_and_every_id_is_answered_once(ray_cluster, model_path, tmp_path, capsys):
    """The first run's engine (the stand-in) refuses the tickets that ask it to; the replay, with the engine
    changed to vLLM, answers exactly those, and records where they came from."""
    tickets = pq.read_table(REPO / "data/samples/tickets").slice(0, 24).to_pylist()
    for t in tickets[::4]:
        t["body"] = f"{t['body']} {REFUSE}"
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(tickets), tmp_path / "in/part-0.parquet")
    sets = ["--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}",
            "--set", "sampling.max_tokens=8", "--no-progress"]
    assert main(["run", str(JOB), *sets, "--set", "engine=stand-in", "--run-id", "night"]) == 0
    first = json.loads((tmp_path / "out/night/summary.json").read_text())
    assert first["errors_by_kind"] == {"engine": 6} and first["records_rejected"] == 6
    capsys.readouterr()

    assert main(["rejects", "replay", str(tmp_path / "out/night"), "--set", "engine=cpu-smollm2", "--no-progress",
                 *QUICK_START_ARGS]) == 0
    assert "replay of" in capsys.readouterr().out
    [replayed] = list((tmp_path / "out").glob("night-replay-*/summary.json"))
    second = json.loads(replayed.read_text())
    assert second["replay_of"] == {"run": str(tmp_path / "out/night"), "run_id": "night", "reasons": ["engine"],
                                   "records": 6}
    assert second["engine"] == "cpu-smollm2" and second["records_in"] == 6 == second["records_out"]
    assert second["records_rejected"] == 0 and second["drift"]["status"] == "not_compared"

    def answered(summary: dict) -> list[str]:
        return pl.read_parquet(summary["output"]["results"])["ticket_id"].to_list() \
            if summary["output"]["results"] else []

    ids = [t["ticket_id"] for t in tickets]
    both = answered(first) + answered(second)
    assert sorted(both) == sorted(ids) and len(set(both)) == len(ids)  # each id once, across both runs
    assert sorted(answered(second)) == sorted(t["ticket_id"] for t in tickets[::4])
    # The replay is no baseline for the next night's drift comparison.
    assert main(["run", str(JOB), *sets, "--set", "engine=stand-in", "--run-id", "next"]) == 0
    assert json.loads((tmp_path / "out/next/summary.json").read_text())["drift"]["previous_run"] == "night"
