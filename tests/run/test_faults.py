"""Faults on the real stack (SeaweedFS S3, Ray, real processes killed): killed drivers and engines, two attempts on
one run, and every kind of bad input. The engine's own faults are on vLLM, on the multi-node cluster (`ray_nodes`);
the driver's, the lease's and the circuit breaker's on the stand-in engine, since what they test (commit, resume,
fencing, the breaker) lives in the driver.

However a run is interrupted, resuming it ends with every input id exactly once
in the committed results and rejects, bad shards quarantined with their reason,
and no file that a manifest does not list.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUICK_START_ARGS, cmdline, tokenmill_driver, uncommitted_results, wait_gone

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
BUCKET = "tokenmill-faults"


def bucket(s3_env):
    """A client of the session's S3 server, with this module's bucket made (by the first test that asks)."""
    client = s3_env.client()
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return client


def put_table(client, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())


def make_input(client, prefix: str, good_shards: int = 6, rows: int = 10) -> dict:
    """Good shards, one shard of every bad-row kind, and shards to quarantine; what each id should become."""
    tickets = pq.read_table(sorted((REPO / "data/samples/tickets").glob("*.parquet")))
    good = tickets.slice(0, good_shards * rows)
    for k in range(good_shards):
        put_table(client, f"{prefix}/part-{k:03d}.parquet", good.slice(k * rows, rows))
    base = tickets.slice(200, 1).to_pylist()[0]
    bad = [
        {**base, "ticket_id": "BAD-NULL", "body": None},
        {**base, "ticket_id": "BAD-EMPTY", "subject": ""},
        {**base, "ticket_id": "BAD-BLANK", "body": " \t\n "},
        {**base, "ticket_id": "BAD-LONG", "body": "refund " * 2500},
        {**base, "ticket_id": "BAD-UTF8", "body": "placeholder"},
        {**base, "ticket_id": None},
        {**base, "ticket_id": good.column("ticket_id")[0].as_py()},  # a duplicate of the first good row
        {**base, "ticket_id": "GOOD-IN-BAD-SHARD"},
    ]
    table = pa.Table.from_pylist(bad, schema=tickets.schema)
    body = table.column("body").combine_chunks().cast(pa.binary()).to_pylist()
    body[4] = b"caf\xe9 au lait"  # latin-1, not UTF-8
    table = table.set_column(table.schema.get_field_index("body"), "body", pa.array(body, pa.binary()).view(pa.string()))
    put_table(client, f"{prefix}/part-900-bad-rows.parquet", table)
    cut = io.BytesIO()
    pq.write_table(tickets.slice(210, 5), cut)
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/part-901-truncated.parquet", Body=cut.getvalue()[:-200])
    drift = tickets.slice(215, 5)
    drift = drift.set_column(drift.schema.get_field_index("body"), "body", pa.array([3.5] * 5))
    put_table(client, f"{prefix}/part-902-float-body.parquet", drift)
    numeric = tickets.slice(220, 5)
    numeric = numeric.set_column(0, "ticket_id", pa.array(range(9001, 9006), pa.int64()))  # cast to text: safe
    put_table(client, f"{prefix}/part-903-int-ids.parquet", numeric)
    expect_ok = [*good.column("ticket_id").to_pylist(), "GOOD-IN-BAD-SHARD", *map(str, range(9001, 9006))]
    expect_rejected = {"BAD-NULL": "empty_input", "BAD-EMPTY": "empty_input", "BAD-BLANK": "empty_input",
                       "BAD-LONG": "prompt_too_long", "BAD-UTF8": "invalid_utf8", None: "null_id",
                       good.column("ticket_id")[0].as_py(): "duplicate_id"}
    return {"ok": expect_ok, "rejected": expect_rejected,
            "quarantined": {"part-901-truncated.parquet": "unreadable", "part-902-float-body.parquet": "schema"}}


def overrides(prefix: str, run: str, *, stand_in: bool = False) -> list[str]:
    """The run's arguments; `stand_in`: the stand-in engine at a pace that leaves time to strike mid-run, for
    faults of the driver (the engine is not what they test; `test_engine_and_actor_killed_mid_run` is on vLLM)."""
    # A killed driver's lease lives on for its ttl: a short one, and a wait, let the next driver take it over. Not
    # shorter: a renewal (every ttl/3) is a conditional write to the store, and on a loaded machine one has taken
    # over 3 s.
    sets = [f"input.path=s3://{BUCKET}/{prefix}/", f"output.path=s3://{BUCKET}/out/", "sampling.max_tokens=12",
            "batch_size=4", "failures.max_share=0.5", "lease.ttl_s=8", "lease.wait_s=60"]
    engine = ["--set", "engine=stand-in", "--engine-set", "stand_in_s_per_request=0.05"] if stand_in else []
    return ["--run-id", run, "--no-progress", *[a for s in sets for a in ("--set", s)], *engine]


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def check_run(client, run: str, expected: dict) -> dict:
    """Every readable id exactly once across committed results and rejects; nothing unlisted; reasons right."""
    root = f"out/{run}/"
    summary = json.loads(client.get_object(Bucket=BUCKET, Key=root + "summary.json")["Body"].read())
    assert root + "_SUCCESS" in keys(client, root)
    listed = {f.removeprefix(f"s3://{BUCKET}/") for f in summary["output"]["results"] + summary["output"]["rejects"]}
    on_store = {k for k in keys(client, root) if k.endswith(".parquet") and "/input/" not in k}
    assert on_store == listed, "files on the store that no manifest lists (or the reverse)"

    def read(files: list[str]) -> pl.DataFrame:
        return pl.concat([pl.read_parquet(io.BytesIO(client.get_object(Bucket=BUCKET, Key=f.removeprefix(
            f"s3://{BUCKET}/"))["Body"].read())) for f in files], how="diagonal_relaxed")

    results, rejects = read(summary["output"]["results"]), read(summary["output"]["rejects"])
    rows = rejects.filter(pl.col("row").is_not_null())
    ids = results["ticket_id"].to_list() + rows["ticket_id"].to_list()
    wanted = expected["ok"] + list(expected["rejected"])
    assert sorted(map(str, ids)) == sorted(map(str, wanted)), "an id is missing or written twice"
    got = {r["ticket_id"]: r["reason"] for r in rows.iter_rows(named=True)}
    assert got == expected["rejected"]
    assert set(results["ticket_id"].to_list()) == set(expected["ok"])
    shards = {r["shard"].rsplit("/", 1)[-1]: r["reason"] for r in rejects.filter(pl.col("row").is_null()).iter_rows(
        named=True)}
    assert shards == expected["quarantined"]
    assert summary["records_in"] == results.height + rows.height
    assert summary["duplicate_ids"] == 1
    # Said outright, though the sorted comparison above implies both: no id twice, none lost.
    assert results["ticket_id"].n_unique() == results.height, "a result was written twice"
    assert not set(map(str, wanted)) - set(map(str, ids)), "a record was lost"
    return summary


def driver(args: list[str], log: Path, nodes=None) -> subprocess.Popen:
    """`tokenmill run JOB` as its own process, joined to the session's Ray cluster (or to `nodes`, the multi-node
    one) as under `ray job submit`."""
    return tokenmill_driver(["run", str(JOB), *args], log, nodes=nodes)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before the fault: "
                                 f"{proc.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the fault's moment never came")
        time.sleep(0.1)


@pytest.mark.cluster
def test_driver_killed_then_resumed(ray_cluster, s3_env, model_path, tmp_path, capsys):
    """Each moment kills a driver: while reading, while generating, while committing. The next moment's driver
    resumes the run the last one left, and so does the final run in this process: a run killed three times, twice
    while resuming, keeps every id once and does not redo what was committed."""
    moments = ("reading", "generating", "committing")
    client = bucket(s3_env)
    prefix, run = f"in-{moments[0]}", f"kill-{moments[0]}"
    expected = make_input(client, prefix)
    root = f"out/{run}/"

    def reading() -> bool:  # the run exists and has begun reading, before any shard is written
        return f"{root}_run.json" in keys(client, root)

    def generating() -> bool:  # results written, no shard committed yet
        found = keys(client, root)
        return any("/results/" in k for k in found)

    def committing() -> bool:  # some shards committed (2 manifests are the quarantined shards'), not all
        return sum("/_manifests/" in k for k in keys(client, root)) >= 4

    for moment in moments:
        proc = driver(overrides(prefix, run, stand_in=True), tmp_path / f"driver-{moment}.log")
        wait_for({"reading": reading, "generating": generating, "committing": committing}[moment], proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert f"{root}_SUCCESS" not in keys(client, root)

    assert main(["run", str(JOB), *overrides(prefix, run, stand_in=True)]) == 0, capsys.readouterr().err[-3000:]
    summary = check_run(client, run, expected)
    assert summary["resumed"] and summary["shards_redone"] < 7, "committed shards were redone"


@pytest.mark.engine
@pytest.mark.cluster
def test_engine_and_actor_killed_mid_run(ray_cluster, ray_nodes, s3_env, model_path, tmp_path, capsys):
    """On the multi-node cluster: its engine process, then its actor, then the driver, each with kill -9; each
    time the killed replica's engine processes are gone within seconds, and resuming ends with every id once."""
    client = bucket(s3_env)
    prefix, run = "in-engine", "kill-engine"
    expected = make_input(client, prefix, good_shards=4)
    root = f"out/{run}/"
    # Every record generates its 16 tokens, so each killed engine leaves work to redo. The engine core in a
    # process of its own (every profile's default), which is what this test kills.
    proc = driver([*overrides(prefix, run), "--set", "sampling.max_tokens=16", "--set", "sampling.ignore_eos=true",
                   "--engine-set", "engine_process=own"], tmp_path / "driver.log", nodes=ray_nodes)

    def engine_ready() -> bool:  # a replica's engine is up, with the run's batches waiting for it
        for key in keys(client, f"{root}_engines/"):
            entry = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            if entry.get("ready_at"):
                return True
        return False

    def named(name: str) -> list[psutil.Process]:
        # Only this session's processes: the Ray clusters it started are its children, and the engines theirs.
        return [p for p in psutil.Process().children(recursive=True) if name in cmdline(p)]

    def engines() -> set[int]:
        return {p.pid for p in named("VLLM::EngineCore")}

    def kill(name: str) -> int:
        victims = 0
        for p in named(name):
            try:
                p.kill()
                victims += 1
            except psutil.Error:  # gone meanwhile
                pass
        return victims

    def gone_after(spawned: list[psutil.Process], what: str, limit: float = 15) -> float:
        took = wait_gone(spawned, limit=limit, what=f"after {what}")
        with capsys.disabled():
            print(f"\nthe replica's engine processes were gone {took:.2f} s after {what}")
        return took

    # The moments come from the processes and the replica's ledger, not from when results appear: Ray Data may
    # write a run's results in one burst at its end.
    wait_for(engine_ready, proc)
    first = engines()
    assert kill("VLLM::EngineCore") == len(first) == 1  # the engine process: the replica starts a new engine
    wait_for(lambda: bool(engines() - first), proc)  # its replacement is starting, the run's work still ahead
    # Now the whole replica: Ray restarts it, and the engine it had started dies with it (its watchdog).
    [replica] = named("MapWorker(MapBatches(GenerateStage))")
    spawned = replica.children(recursive=True)
    assert any("VLLM::EngineCore" in cmdline(p) for p in spawned), [cmdline(p) for p in spawned]
    before = engines()
    replica.kill()
    gone_after(spawned, "kill -9 of the replica's actor")
    wait_for(lambda: bool(engines() - before), proc)  # the restarted replica's engine is starting
    # Then the driver: Ray ends the job's actors, and their engines go with them.
    [replica] = named("MapWorker(MapBatches(GenerateStage))")
    spawned = [replica, *replica.children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone_after(spawned, "kill -9 of the driver", limit=30)
    # The run is resumed as after any killed driver, and ends with every id once.
    assert main(["run", str(JOB), *overrides(prefix, run), "--set", "sampling.max_tokens=16",
                 "--set", "sampling.ignore_eos=true", *QUICK_START_ARGS]) == 0, capsys.readouterr().err[-3000:]
    check_run(client, run, expected)


@pytest.mark.cluster
def test_circuit_breaker_stops_the_run_and_resume_finishes_it(ray_cluster, s3_env, model_path, capsys):
    client = bucket(s3_env)
    tickets = pq.read_table(sorted((REPO / "data/samples/tickets").glob("*.parquet")))
    put_table(client, "in-breaker/part-0.parquet", tickets.slice(0, 10))
    put_table(client, "in-breaker/part-1.parquet", tickets.slice(10, 10))
    blank = tickets.slice(20, 20)
    put_table(client, "in-breaker/part-2.parquet",
              blank.set_column(blank.schema.get_field_index("body"), "body", pa.array([" "] * 20)))
    args = overrides("in-breaker", "breaker", stand_in=True)
    strict = [*args, "--set", "failures.max_share=0.3", "--set", "failures.min_records=10"]
    assert main(["run", str(JOB), *strict]) == 6
    err = capsys.readouterr().err
    assert "stopped:" in err and "more than failures.max_share 30%" in err and "run again to resume" in err
    assert "out/breaker/_SUCCESS" not in keys(client, "out/breaker/")

    # The breaker's threshold is not part of what the results depend on: raising it resumes the same run.
    assert main(["run", str(JOB), *args, "--set", "failures.max_share=0.9"]) == 0
    summary = json.loads(client.get_object(Bucket=BUCKET, Key="out/breaker/summary.json")["Body"].read())
    assert summary["records_in"] == 40 and summary["records_rejected"] == 20 and summary["records_ok"] == 20


@pytest.mark.cluster
def test_two_attempts_on_one_run_one_refused_one_taken_over(ray_nodes, s3_env, model_path, tmp_path):
    """Attempt A has written results it has not committed. A second attempt is refused, naming A. A then
    stalls (SIGSTOP) past its lease; a third attempt, started beside the second and asked to wait, takes the lease
    over once it expires, cleans A's debris and finishes; A, woken, finds its lease gone and commits nothing.
    Every listed file exists and every id is there exactly once.

    On the multi-node cluster and the stand-in engine (what races is the drivers' lease and commits); the same
    refusal on vLLM is part of the node-loss night (tests/run/test_cluster.py)."""
    client = bucket(s3_env)
    prefix, run = "in-lease", "lease-race"
    expected = make_input(client, prefix, good_shards=4)
    root = f"out/{run}/"
    ttl = 20
    # A slow stand-in (0.2 s a record): A is still at work when it is stalled.
    args = [*overrides(prefix, run, stand_in=True), "--engine-set", "stand_in_s_per_request=0.2",
            "--set", f"lease.ttl_s={ttl}", "--set", "lease.wait_s=0"]

    def lease() -> dict:
        return json.loads(client.get_object(Bucket=BUCKET, Key=f"{root}_lease.json")["Body"].read())

    a = driver(args, tmp_path / "a.log", nodes=ray_nodes)
    wait_for(lambda: uncommitted_results(keys(client, root)), a)
    # Stalled, not dead: its replica lives on, and its lease, renewed every ttl/3, still has two thirds of the
    # ttl or more to run, long enough for a second attempt to start and be refused.
    a.send_signal(signal.SIGSTOP)
    try:
        refused = driver(args, tmp_path / "b.log", nodes=ray_nodes)
        taker = driver([*args, "--set", "lease.wait_s=120"], tmp_path / "c.log", nodes=ray_nodes)
        assert refused.wait(timeout=120) == 7, refused.log.read_text()[-2000:]
        said = refused.log.read_text()
        assert "being run by " in said and f"pid {a.pid}" in said and "lease token 1" in said, said[-2000:]
        assert lease()["token"] == 1 and taker.poll() is None  # the taker waits: A's lease is still live
        wait_for(lambda: lease()["token"] == 2, taker)
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 7, a.log.read_text()[-3000:]
    assert "_lease.json: refused to " in a.log.read_text(), a.log.read_text()[-3000:]
    assert taker.wait(timeout=600) == 0, taker.log.read_text()[-3000:]
    summary = check_run(client, run, expected)  # every listed file exists, nothing unlisted, every id once
    attempt = summary["attempt"]
    assert attempt["lease_token"] == 2 and f"pid {a.pid}" in attempt["took_over_from"], attempt
    assert lease()["released"] and lease()["token"] == 2
