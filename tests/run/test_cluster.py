"""A real multi-node Ray cluster (`ray start`: a head and two worker nodes on 127.0.0.1, `ray_nodes`), jobs
submitted through its Jobs API with `tokenmill submit`, input and output in S3 with credentials that reach the
job only through the nodes' environment.

One night is submitted with a replica on each worker node; one node is killed
with SIGKILL mid-run (its raylet first, then its Ray workers). Ray Data retries
the lost batches and restarts the lost replica on the node that is left, and the
run finishes without an operator: every id once, the rework within the lost
replica's batches, the loss in the summary. The killed node's engine processes
die within seconds (their watchdog). A second attempt at the night, started
while the first has results it has not committed, is refused and names it. The
night again is found and not rerun, and no credential is in any log or output.

The other tests on this cluster: the engine, actor and driver kills and the lease
race (tests/run/test_faults.py) and Airflow's nightly task (tests/infra/test_airflow.py).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import S3_KEY, S3_SECRET, alive, cmdline, jobs_api, uncommitted_results, wait_gone

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tokenmill-cluster"
NIGHT = "2026-11-27"
SHARDS, ROWS = 3, 16


def _bucket(client) -> None:
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


def _upload(client, prefix: str) -> list[str]:
    _bucket(client)
    table = pq.read_table(REPO / "data/samples/tickets").slice(0, SHARDS * ROWS)
    for k in range(SHARDS):
        buf = io.BytesIO()
        pq.write_table(table.slice(k * ROWS, ROWS), buf)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/part-{k}.parquet", Body=buf.getvalue())
    return table.column("ticket_id").to_pylist()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _objects(client, prefix: str) -> dict[str, bytes]:
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in _keys(client, prefix)}


@pytest.mark.cluster
def test_a_local_output_path_is_refused_on_a_multi_node_cluster(_ray_nodes, tmp_path):
    """On the cluster as the node-loss night left it (it runs after that test): a head and one worker node are
    still more than one disk."""
    nodes = len(_ray_nodes.alive_nodes())
    assert nodes >= 2
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(REPO / "conf/jobs/ticket_triage.yaml"),
                           "--set", f"output.path={out}", "--no-progress"], env=_ray_nodes.driver_env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"output.path: {out} is a local path, but the Ray cluster" in done.stderr
    assert f"has {nodes} nodes" in done.stderr and "s3://" in done.stderr
    assert not out.exists()  # refused before anything was written


@pytest.mark.engine
@pytest.mark.cluster
@pytest.mark.loses_a_node
def test_a_night_on_two_nodes_survives_losing_one_and_runs_once(ray_nodes, s3_env, model_path, capsys):
    client = s3_env.client()
    ids = _upload(client, f"tickets/{NIGHT}")
    submit = ["submit", str(REPO / "conf/jobs/ticket_triage.yaml"), "--date", NIGHT, "--address", ray_nodes.address,
              "--runtime-env", str(REPO / "conf/runtime_env.yaml"), "--poll", "1",
              "--set", f"input.path=s3://{BUCKET}/tickets/{{date}}/", "--set", f"output.path=s3://{BUCKET}/triage/",
              # Every record generates its 16 tokens in batches of 4, two replicas: the run is mid-way when a
              # node is lost, with work on both.
              "--set", "sampling.max_tokens=16", "--set", "sampling.ignore_eos=true", "--set", "batch_size=4",
              "--set", "actors.min=2", "--set", "actors.max=2"]
    # (The spec is checked where the command runs, before submitting: s3_env gives this process the store too.)
    assert main([*submit, "--no-wait"]) == 0, capsys.readouterr().out[-4000:]
    assert f"submitted tokenmill-ticket_triage-{NIGHT}" in capsys.readouterr().out
    sid = f"tokenmill-ticket_triage-{NIGHT}"
    api = jobs_api(ray_nodes.address)

    def replicas() -> list[dict]:  # each replica writes its ledger entry when it starts, and again when ready
        return [json.loads(v) for k, v in _objects(client, "triage/").items() if "/_engines/" in k]

    deadline = time.monotonic() + 420
    while len(found := replicas()) < 2 or not any(e.get("ready_at") for e in found):
        status = str(api.get_job_status(sid))
        assert "SUCCEEDED" not in status and "FAILED" not in status, (found, api.get_job_logs(sid)[-3000:])
        assert time.monotonic() < deadline, "the replicas never started"
        time.sleep(0.5)
    # Placement is visible: a replica on each worker node.
    names = {n["node_id"]: next(r for r in n["resources_total"] if r.startswith("node_"))
             for n in ray_nodes.alive_nodes() if not n["is_head_node"]}
    assert sorted(names[e["node"]] for e in found) == ["node_a", "node_b"], found
    run_dir = next(k for k in _keys(client, "triage/") if k.endswith("/_run.json")).rsplit("/", 1)[0]
    assert f"{run_dir}/_SUCCESS" not in _keys(client, run_dir)  # still running
    # The node whose replica's engine is up first, so that it has batches in flight when it is lost.
    victim = next(e["node"] for e in found if e.get("ready_at"))
    lost = names[victim]

    # Lose it: its raylet and the rest of its Ray daemons first, so that the replica must notice alone...
    procs = ray_nodes.processes(lost)
    engines = [p for p in procs if "VLLM" in cmdline(p)]
    assert engines, [cmdline(p) for p in procs]
    workers = [p for p in procs if cmdline(p).startswith("ray::")]
    daemons = [p for p in procs if p not in engines and p not in workers and "pipelines.stages.watchdog" not in
               cmdline(p)]
    for p in daemons:
        p.kill()
    took = wait_gone(engines, limit=30, what="the lost node's engine lives on")
    with capsys.disabled():
        print(f"\n{lost}'s engine processes were gone {took:.2f} s after kill -9 of its raylet")
    for p in workers:  # ...then whatever of its Ray workers is left: the node is gone whole
        if alive(p):
            p.kill()

    # A second attempt at the same night while this one runs (a scheduler's retry, or a hand): once the run has
    # results it has not committed, it is started beside it, and refused, naming the holder. The first one's
    # driver is held (SIGSTOP) meanwhile, its lease live (60 s, renewed every 20), so that on a fast machine it
    # cannot finish before the second one, a new Python process, has got as far as the lease.
    while not uncommitted_results(_keys(client, f"{run_dir}/")):
        assert "RUNNING" in str(api.get_job_status(sid)), api.get_job_logs(sid)[-3000:]
        time.sleep(0.2)
    first = [p for p in psutil.process_iter() if "jobs.shipped" in cmdline(p)]  # (and its shell, if one is left)
    assert first
    for p in first:
        p.suspend()
    try:
        second = subprocess.run([sys.executable, "-m", "jobs.ticket_triage", "--date", NIGHT,
                                 *submit[submit.index("--set"):], "--no-progress"], env=ray_nodes.driver_env,
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        for p in first:
            p.resume()
    assert second.returncode == 7, second.stderr[-3000:]
    assert "being run by " in second.stderr and f"(Ray job {sid})" in second.stderr, second.stderr[-3000:]

    # The run finishes by itself: no operator, no second submission.
    assert main([*submit, "--timeout", "600"]) == 0, capsys.readouterr().out[-4000:]
    out = capsys.readouterr().out
    assert f"{sid} ended SUCCEEDED" in out and "submitted tokenmill" not in out
    outputs = _objects(client, "triage/")
    summary = json.loads(outputs[f"{run_dir}/summary.json"])
    results = pl.concat([pl.read_parquet(io.BytesIO(outputs[u.removeprefix(f"s3://{BUCKET}/")]))
                         for u in summary["output"]["results"]])
    assert sorted(results["ticket_id"].to_list()) == sorted(ids), "an id is missing or written twice"
    assert summary["records_in"] == len(ids) == summary["records_out"] and not summary["output"]["rejects"]
    listed = {u.removeprefix(f"s3://{BUCKET}/") for u in summary["output"]["results"]}
    assert {k for k in outputs if k.endswith(".parquet")} == listed  # nothing unlisted left behind
    attempt = summary["attempt"]
    with capsys.disabled():
        print(f"\nnode loss: {len(ids)} rows in, {results.height} out, {attempt['rows_redone']} generated twice, "
              f"{attempt['replicas_started']} replicas started, wall {summary['wall_s']:.1f} s")
    assert attempt["nodes_lost"] == [victim] and attempt["replicas_started"] >= 3, attempt
    # Each engine core ran in a process of its own (the profile's default): a replica's ledger keeps the
    # engine's memory apart from its actor's.
    worked = [e for e in replicas() if e.get("batches")]
    assert worked and all(e["engine_peak_rss_mb"] > 1000 and e["actor_peak_rss_mb"] > 0 for e in worked), worked
    # The rework is the lost replica's batches in flight: Ray Data gives an actor at most 4 calls at once
    # (2 running, 2 queued; `max_tasks_in_flight_per_actor`), of batch_size rows each, plus those it had
    # finished whose outputs were still in the lost node's object store.
    assert attempt["rows_redone"] <= 2 * 4 * 4, attempt

    # The same night again: recognised, nothing submitted.
    assert main(submit) == 0
    again = capsys.readouterr().out
    assert "already ran; nothing submitted" in again and "submitted tokenmill" not in again
    # (Drivers that joined the cluster directly are jobs without a submission id.)
    assert [j.submission_id for j in api.list_jobs() if (j.submission_id or "").startswith(sid)] == [sid]

    # The credentials are in no job log, driver or worker log of any node, output file, summary or report.
    logs = api.get_job_logs(sid)
    assert "ticket_triage" in logs
    places = {"job log": logs.encode(), **{f"s3://{BUCKET}/{k}": v for k, v in _objects(client, "").items()}}
    files = [p for p in Path(ray_nodes.temp).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("job-driver-") for p in files)  # the driver's log is among them
    for path in files:
        try:
            places[str(path)] = path.read_bytes()
        except OSError:
            continue
    assert len(places) > 20
    for secret in (S3_SECRET, S3_KEY):
        leaked = [where for where, data in places.items() if secret.encode() in data]
        assert not leaked, f"{secret} found in {leaked[:5]}"
