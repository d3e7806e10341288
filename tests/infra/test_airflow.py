"""The nightly DAG in a real Airflow installation (its own virtual environment, `.venv-airflow`, built by
`make airflow`): it loads without import errors, has the schedule and the templated partition, and its submit
task runs a night on the multi-node test cluster (`ray_nodes`) through its Jobs API, and on a second try finds
that night instead of running it again."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import S3_SECRET, jobs_api

from pipelines.run.submit import auth_headers

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VENV = REPO / ".venv-airflow"
DAGS = REPO / "infra/airflow/dags"
PLUGINS = REPO / "infra/airflow/plugins"
BUCKET = "tokenmill-airflow"
NIGHT = "2026-11-26"
CANARY = "tm-canary-airflow-5d41402abc"

INSPECT = r"""
import datetime as dt, json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    task = dag.get_task("submit")
    run_after = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.timezone.utc)
    interval = dag.timetable.infer_manual_data_interval(run_after=run_after)
    template = task.partition
    rendered = task.render_template(template, {"data_interval_start": interval.start, "ds": "wrong"},
                                    jinja_env=dag.get_template_env())
    out["dags"][dag_id] = {"timetable": type(dag.timetable).__name__, "cron": getattr(dag.timetable, "_expression", None),
                          "summary": dag.timetable.summary, "catchup": dag.catchup, "retries": task.retries,
                          "job": task.job, "template": template, "rendered": rendered,
                          "interval": [interval.start.isoformat(), interval.end.isoformat()]}
print("TOKENMILL_DAGS " + json.dumps(out))
"""


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_ADDRESS"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
               AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
               PATH=f"{AIRFLOW_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return env


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory) -> Path:
    if not (AIRFLOW_VENV / "bin/airflow").is_file():
        if os.environ.get("CI"):
            pytest.fail("Airflow is not installed: `make test` builds .venv-airflow (`make airflow`)")
        pytest.skip("Airflow is not installed: `make airflow` builds .venv-airflow")
    home = tmp_path_factory.mktemp("airflow")
    done = subprocess.run([str(AIRFLOW_VENV / "bin/airflow"), "db", "migrate"], env=airflow_env(home),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return home


def test_dags_load_with_the_nightly_schedule_and_partition(airflow_home):
    done = subprocess.run([str(AIRFLOW_VENV / "bin/python"), "-c", INSPECT, str(DAGS)], env=airflow_env(airflow_home),
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("TOKENMILL_DAGS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    found = json.loads(lines[-1].removeprefix("TOKENMILL_DAGS "))
    assert found["import_errors"] == {}
    jobs = sorted(p.stem for p in (REPO / "conf/jobs").glob("*.yaml"))
    assert sorted(found["dags"]) == [f"tokenmill_nightly_{j}" for j in jobs]
    for dag_id, d in found["dags"].items():
        assert d["job"] == dag_id.removeprefix("tokenmill_nightly_")
        assert d["timetable"] == "CronDataIntervalTimetable" and d["summary"] == "0 2 * * *"
        assert not d["catchup"] and d["retries"] == 2
        # The partition is the data interval's start, not the logical date: the night that just ended.
        assert d["template"] == "{{ data_interval_start | ds }}"
        assert d["interval"] == ["2026-11-26T02:00:00+00:00", "2026-11-27T02:00:00+00:00"]
        assert d["rendered"] == "2026-11-26"


POLL = """
import sys
sys.path.insert(0, sys.argv[1])
import tokenmill_ray
try:
    print("POLL", tokenmill_ray.poll_seconds())
except ValueError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize(("value", "expected"), [
    ("2.5", "POLL 2.5"),
    ("soon", "REFUSED Airflow Variable tokenmill_poll_s: 'soon' is not a number of seconds above zero"),
    ("0", "REFUSED Airflow Variable tokenmill_poll_s: '0' is not a number of seconds above zero"),
])
def test_the_poll_interval_variable_is_seconds_above_zero_or_refused_by_name(airflow_home, value, expected):
    done = subprocess.run([str(AIRFLOW_VENV / "bin/python"), "-c", POLL, str(PLUGINS)],
                          env=airflow_env(airflow_home, AIRFLOW_VAR_TOKENMILL_POLL_S=value), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [ln for ln in done.stdout.splitlines() if ln.startswith(("POLL", "REFUSED"))] == [expected]


@pytest.mark.cluster
def test_submit_task_runs_a_night_on_the_cluster_and_a_retry_finds_it(airflow_home, ray_nodes, s3_env, model_path):
    client = s3_env.client()
    client.create_bucket(Bucket=BUCKET)
    table = pq.read_table(REPO / "data/samples/tickets").slice(40, 16)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=BUCKET, Key=f"tickets/{NIGHT}/part-0.parquet", Body=buf.getvalue())
    # The stand-in engine: what this tests is Airflow's task and the Ray head; `tokenmill submit` on vLLM is
    # tests/run/test_cluster.py.
    overrides = {"ticket_triage": [f"input.path=s3://{BUCKET}/tickets/{{date}}/", f"output.path=s3://{BUCKET}/out/",
                                  "sampling.max_tokens=8", "engine=stand-in"]}
    # The cluster and its Ray token come from an Airflow Connection; no token file or variable is left to find.
    token = auth_headers()["Authorization"].removeprefix("Bearer ")
    host, port = ray_nodes.address.removeprefix("http://").split(":")
    connection = json.dumps({"conn_type": "http", "host": host, "port": int(port), "password": token})
    env = airflow_env(airflow_home, AIRFLOW_CONN_TOKENMILL_RAY=connection, RAY_AUTH_TOKEN_PATH=str(airflow_home / "none"),
                      AIRFLOW_VAR_TOKENMILL_OVERRIDES=json.dumps(overrides), AIRFLOW_VAR_TOKENMILL_POLL_S="1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"):  # the cluster holds them
        env.pop(key, None)
    # A run at 02:00 the morning after NIGHT: its data interval is NIGHT 02:00 to 02:00, its partition NIGHT.
    task = [str(AIRFLOW_VENV / "bin/airflow"), "tasks", "test", "tokenmill_nightly_ticket_triage", "submit",
            "2026-11-27T02:00:00+00:00"]

    # A credential among the overrides is refused before the cluster is contacted, without repeating it.
    canary = {"ticket_triage": [*overrides["ticket_triage"], f"storage.secret_access_key={CANARY}"]}
    refused = subprocess.run(task, env={**env, "AIRFLOW_VAR_TOKENMILL_OVERRIDES": json.dumps(canary)},
                             capture_output=True, text=True, timeout=300)
    log = refused.stdout + refused.stderr
    assert "new_state=failed" in log and "--set storage.secret_access_key: looks like a credential" in log, log[-5000:]
    assert CANARY not in log.replace(json.dumps(canary), "")  # (Airflow's own echo of the variable aside)

    first = subprocess.run(task, env=env, capture_output=True, text=True, timeout=900)
    log = first.stdout + first.stderr
    (airflow_home / "first-task.log").write_text(log)
    # `airflow tasks test` exits 0 even when the task fails: the task's own end state says.
    assert first.returncode == 0 and "new_state=success" in log, log[-5000:]
    assert f"submitted tokenmill-ticket_triage-{NIGHT}" in log and "SUCCEEDED" in log
    # It waited in the triggerer (inline under `tasks test`), holding no worker slot, and the token stayed out.
    assert "no worker slot held" in log and "running trigger in line" in log, log[-5000:]
    assert token not in log

    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="out/").get("Contents", [])]
    (success,) = [k for k in keys if k.endswith("_SUCCESS")]
    assert f"ticket_triage-{NIGHT}-" in success
    summary = json.loads(client.get_object(Bucket=BUCKET, Key=success.replace("_SUCCESS", "summary.json"))["Body"]
                         .read())
    assert summary["records_in"] == summary["records_out"] == 16

    # The task again, as a retry would run it: the night is found, nothing is submitted.
    again = subprocess.run(task, env=env, capture_output=True, text=True, timeout=300)
    log = again.stdout + again.stderr
    assert again.returncode == 0 and "new_state=success" in log, log[-5000:]
    assert "already ran; nothing submitted" in log
    ours = [j.submission_id for j in jobs_api(ray_nodes.address).list_jobs()
            if j.submission_id and j.submission_id.startswith(f"tokenmill-ticket_triage-{NIGHT}")]
    assert ours == [f"tokenmill-ticket_triage-{NIGHT}"]
    # What the Jobs API keeps of every job (entrypoint, metadata, runtime_env) holds neither secret.
    records = json.dumps([j.model_dump(mode="json") if hasattr(j, "model_dump") else j.__dict__
                          for j in jobs_api(ray_nodes.address).list_jobs()], default=str)
    assert CANARY not in records and token not in records and S3_SECRET not in records


STOPS = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import tokenmill_ray
from pipelines.run.submit import connect

client = connect(*tokenmill_ray.cluster("tokenmill_ray"))

def status(sid):
    s = client.get_job_status(sid)
    return str(getattr(s, "value", s))

def long_job(sid):
    client.submit_job(entrypoint="sleep 600", submission_id=sid)
    while status(sid) != "RUNNING":
        time.sleep(0.5)

async def first_event(trigger):
    async for event in trigger.run():
        return event.payload

def status_after_stop(sid, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (now := status(sid)) in ("STOPPED", "FAILED", "SUCCEEDED"):
            return now
        time.sleep(0.5)
    return "still " + now

out = {}
long_job("tm-deadline")
trigger = tokenmill_ray.RayJobTrigger(conn_id="tokenmill_ray", submission_id="tm-deadline", repo=sys.argv[2],
                                      poll_s=0.5, deadline=time.time() + 3)
out["deadline_event"] = asyncio.run(first_event(trigger))["status"]
out["deadline_job"] = status_after_stop("tm-deadline")
long_job("tm-killed")
trigger = tokenmill_ray.RayJobTrigger(conn_id="tokenmill_ray", submission_id="tm-killed", repo=sys.argv[2],
                                      poll_s=0.5, deadline=None)
asyncio.run(trigger.on_kill())
out["killed_job"] = status_after_stop("tm-killed")
long_job("tm-operator")
op = tokenmill_ray.TokenmillNightOperator(task_id="t", job="ticket_triage", partition="2026-11-25", repo=sys.argv[2])
op.submission_id = "tm-operator"
op.on_kill()
out["operator_job"] = status_after_stop("tm-operator")
# How a finished night's end reaches the task: a breached gate (exit 8) and a spent budget (9) fail it without a
# retry; any other failure (1) is raised to be retried.
for sid, code in (("tm-gate", 8), ("tm-budget", 9), ("tm-fault", 1)):
    said = f"tokenmill: error: run {sid}: a verdict on the night"
    client.submit_job(entrypoint=f"python -c \"import sys; print({said!r}, file=sys.stderr); sys.exit({code})\"",
                      submission_id=sid)
    event = asyncio.run(first_event(tokenmill_ray.RayJobTrigger(conn_id="tokenmill_ray", submission_id=sid,
                                                                repo=sys.argv[2], poll_s=0.5, deadline=None)))
    try:
        op.execute_complete({}, event)
        out[sid] = ["returned"]
    except Exception as exc:
        out[sid] = [type(exc).__name__, event["exit_code"], str(exc)]
print("STOPS " + json.dumps(out))
"""


@pytest.mark.cluster
def test_a_killed_or_timed_out_task_stops_its_ray_job(airflow_home, ray_nodes):
    """The trigger's deadline (the task's execution_timeout) and a user's kill, in the triggerer or on the worker,
    each stop the Ray job, on the real Jobs API, through the Connection; and a night's end fails the task without a
    retry on a breached gate or a spent budget (the run's exit code, read from the Jobs API), with one otherwise."""
    token = auth_headers()["Authorization"].removeprefix("Bearer ")
    host, port = ray_nodes.address.removeprefix("http://").split(":")
    connection = json.dumps({"conn_type": "http", "host": host, "port": int(port), "password": token})
    env = airflow_env(airflow_home, AIRFLOW_CONN_TOKENMILL_RAY=connection, RAY_AUTH_TOKEN_PATH=str(airflow_home / "none"))
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run([str(AIRFLOW_VENV / "bin/python"), "-c", STOPS, str(PLUGINS), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=400)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("STOPS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("STOPS "))
    assert {k: out.pop(k) for k in ("deadline_event", "deadline_job", "killed_job", "operator_job")} == {
        "deadline_event": "TIMED_OUT", "deadline_job": "STOPPED", "killed_job": "STOPPED", "operator_job": "STOPPED"}
    # AirflowFailException fails the task at once, whatever its retries; RuntimeError is retried.
    assert [out[k][:2] for k in ("tm-gate", "tm-budget", "tm-fault")] == [
        ["AirflowFailException", 8], ["AirflowFailException", 9], ["RuntimeError", 1]], out
    assert out["tm-gate"][2].startswith("tm-gate: drift gate breached, not retried. tokenmill: error: run tm-gate")
    assert "budget spent, not retried (raise budget.max_usd" in out["tm-budget"][2]
