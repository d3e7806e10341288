"""The run's budget (`budget:`): the keeper's arithmetic, a run stopped by it on vLLM and resumed under a higher
cap, and a run billed in accelerator time stopped by dollars."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS

from pipelines.cli import main
from pipelines.config import load_job
from pipelines.run.budget import BudgetKeeper

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"


def test_a_batch_is_refused_once_it_could_pass_the_cap_and_every_one_after_it():
    keeper = BudgetKeeper(max_usd=1.0, max_output_tokens=None, mode="per_token", usd_per_replica_s=0.0,
                          spent_usd=0.25)
    assert keeper.reserve("a", 0.5, 10)  # 0.25 committed + 0.5
    assert not keeper.reserve("b", 0.5, 10)  # + 0.5 in flight would be 1.25
    assert keeper.stopped == "max_usd" and not keeper.reserve("c", 0.0, 0)
    keeper.settle("a", 0.3, 10, 1.0, 8)  # the worst case was not reached; the stop stands
    state = keeper.state()
    assert state["spent_usd"] == pytest.approx(0.55) and state["refused"] == 2 and state["in_flight"] == 0

    tokens = BudgetKeeper(max_usd=None, max_output_tokens=100, mode="per_token", usd_per_replica_s=0.0,
                          spent_tokens=40)
    assert tokens.reserve("a", 0.0, 60) and not tokens.reserve("b", 0.0, 1)
    assert tokens.stopped == "max_output_tokens"


def test_in_accelerator_time_spend_is_replica_time_and_a_batch_costs_what_batches_took():
    keeper = BudgetKeeper(max_usd=10.5, max_output_tokens=None, mode="accelerator_time", usd_per_replica_s=1.0)
    keeper.replica_started("r1", 1000.0)
    assert keeper.spent_usd(now=1004.0) == 4.0
    keeper.replicas["r1"] = time.time() - 4.0  # four seconds of replica time so far
    assert keeper.reserve("a", 99.0, 0)  # the per-token worst case is not what it costs: the first batch is free
    keeper.settle("a", 0.0, 0, 3.0, 8)
    assert keeper.state()["largest_batch_usd"] == 3.0
    assert keeper.reserve("b", 0.0, 0) and keeper.reserve("c", 0.0, 0)  # ~4 s + 3 + 3 in flight: within
    assert not keeper.reserve("d", 0.0, 0) and keeper.stopped == "max_usd"  # one more would pass 10.5
    # What the replica cost before its first batch asked to go: its four seconds of start and wait.
    assert keeper.state()["spent_before_first_batch_usd"] == pytest.approx(4.0, abs=0.5)

    # A cap passed before any batch asked (the replicas started and waited for input): the first is refused.
    late = BudgetKeeper(max_usd=2.0, max_output_tokens=None, mode="accelerator_time", usd_per_replica_s=1.0)
    late.replica_started("r1", time.time() - 5.0)
    assert not late.reserve("a", 0.0, 0) and late.stopped == "max_usd"
    assert late.state()["batches"] == 0 and late.state()["spent_before_first_batch_usd"] == pytest.approx(5.0, abs=0.5)


def _tickets(tmp_path: Path, shards: int = 3, per_shard: int = 16) -> list[str]:
    table = pq.read_table(REPO / "data/samples/tickets").slice(0, shards * per_shard)
    (tmp_path / "in").mkdir()
    for k in range(shards):
        pq.write_table(table.slice(k * per_shard, per_shard), tmp_path / f"in/part-{k}.parquet")
    return table.column("ticket_id").to_pylist()


@pytest.mark.engine
def test_the_budget_stops_a_run_on_vllm_and_a_higher_cap_resumes_it(ray_cluster, model_path, tmp_path, capsys):
    """48 tickets in 6 shards of 8, batches of 8 rows at 16 output tokens each (128 a batch, worst case and
    actual): a cap of 300 output tokens lets two batches go, two shards' worth."""
    from test_cost_report import ray_metrics

    ids = _tickets(tmp_path, shards=6, per_shard=8)
    sets = ["--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}",
            "--set", "sampling.max_tokens=16", "--set", "sampling.ignore_eos=true", "--set", "batch_size=8",
            "--run-id", "capped", "--no-progress", *QUICK_START_ARGS]
    assert main(["run", str(JOB), *sets, "--set", "budget.max_output_tokens=300"]) == 9
    said = capsys.readouterr().err
    assert "stopped: budget.max_output_tokens reached" in said and "raise the cap" in said, said[-2000:]
    run = tmp_path / "out/capped"
    assert not (run / "_SUCCESS").exists()
    first = json.loads((run / "summary.json").read_text())
    budget = first["budget"]
    assert first["stopped"] == "budget" and budget["spent_output_tokens"] <= 300 and budget["overshoot_usd"] == 0
    assert budget["batches"] == 2 and budget["batches_refused"] >= 1
    assert first["records_out"] == first["completion_tokens"] // 16 == 16 and first["input"]["shards"] == 2
    # The gauge Prometheus scrapes: spend against the cap.
    assert ray_metrics(r'ray_tokenmill_budget_spent_output_tokens\{[^}]*run_id="capped"[^}]*\} (\S+)',
                       expected=budget["spent_output_tokens"]) == budget["spent_output_tokens"]
    assert ray_metrics(r'ray_tokenmill_budget_max_output_tokens\{[^}]*run_id="capped"[^}]*\} (\S+)',
                       expected=300) == 300
    with capsys.disabled():
        print(f"\nbudget (per token, 300 output tokens): spent {budget['spent_output_tokens']} tokens in "
              f"{budget['batches']} batches, {budget['batches_refused']} refused, overshoot "
              f"${budget['overshoot_usd']} ({budget['overshoot_batches']} batches); {first['records_out']} records "
              "committed")

    # A higher cap: the same run resumes; the committed shard is not redone and each id is answered once.
    assert main(["run", str(JOB), *sets, "--set", "budget.max_output_tokens=100000"]) == 0
    done = json.loads((run / "summary.json").read_text())
    assert (run / "_SUCCESS").exists() and done["stopped"] is None and done["resumed"]
    results = pl.read_parquet(done["output"]["results"])
    assert sorted(results["ticket_id"].to_list()) == sorted(ids)
    assert done["budget"]["spent_output_tokens"] == 48 * 16 and done["shards_redone"] == 4


def test_in_accelerator_time_the_dollar_cap_stops_the_run_within_about_a_batch(ray_cluster, model_path, tmp_path,
                                                                            capsys):
    """On the stand-in engine (0.5 s a request, so a batch of 8 takes 4 s), billed as the embedded profile's
    2-vCPU machine: a cap of 32 s of replica time stops it part way, since the 192 records take 96 s of batch
    time (about 50 s of the replica's, which runs two batches at once).

    The replica is billed from its creation, and nothing asks the keeper before the first batch. Unloaded, its
    first batch asked to go about 3 s after it was made; on a loaded 2-core machine, 24-36 s. The cap leaves room for
    that, and where even that was passed before the first batch, the stop must come at that batch."""
    ids = _tickets(tmp_path, shards=12)
    sets = ["--set", f"input.path={tmp_path / 'in'}", "--set", f"output.path={tmp_path / 'out'}",
            "--set", "sampling.max_tokens=4", "--set", "batch_size=8", "--set", "cost.mode=accelerator_time",
            "--engine-set", "backend=stand-in", "--engine-set", "stand_in_s_per_request=0.5",
            "--run-id", "dollars", "--no-progress"]
    job = load_job(JOB, overrides=["cost.mode=accelerator_time"])
    per_s = job.usd_per_replica_s()
    cap = round(per_s * 32, 9)
    assert main(["run", str(JOB), *sets, "--set", f"budget.max_usd={cap}"]) == 9
    summary = json.loads((tmp_path / "out/dollars/summary.json").read_text())
    budget = summary["budget"]
    before = budget["spent_before_first_batch_usd"]
    with capsys.disabled():
        print(f"\nbudget (accelerator time, ${cap}): spent ${budget['spent_usd']:.9f} "
              f"({budget['spent_usd'] / per_s:.1f} replica-s, {before / per_s:.1f} of them before the first "
              f"batch) in {budget['batches']} batches, overshoot ${budget['overshoot_usd']:.9f} = "
              f"{budget['overshoot_batches']} batches of ${budget['largest_batch_usd']:.9f}; "
              f"{summary['records_out']} of {len(ids)} records committed")
    assert summary["stopped"] == "budget" and not (tmp_path / "out/dollars/_SUCCESS").exists()
    assert summary["records_out"] < len(ids) and 0 < before <= budget["spent_usd"]
    if before < cap:  # the first batch went, and the cap stopped the ones after it
        assert 0 < budget["batches"]
        # Past the cap by at most about a batch: the batches in flight, and the moment the driver takes to let
        # the replicas go (it looks twice a second).
        assert budget["overshoot_usd"] <= budget["largest_batch_usd"] + per_s * 2.0
    else:  # spent while waiting for input: refused at the first batch, and nothing went to the engine
        assert budget["batches"] == 0 and budget["batches_refused"] > 0 and summary["records_out"] == 0
        assert budget["overshoot_usd"] <= before - cap + per_s * 2.0
