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
from conftest import jobs_api

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_VENV = REPO / ".venv-airflow"
DAGS = REPO / "infra/airflow/dags"
BUCKET = "tokenmill-airflow"
NIGHT = "2026-11-26"

INSPECT = r"""
import datetime as dt, json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    task = dag.get_task("submit")
    run_after = dt.datetime(2026, 11, 27, 2, 0, tzinfo=dt.timezone.utc)
    interval = dag.timetable.infer_manual_data_interval(run_after=run_after)
    template = task.op_kwargs["partition"]
    rendered = task.render_template(template, {"data_interval_start": interval.start, "ds": "wrong"},
                                    jinja_env=dag.get_template_env())
    out["dags"][dag_id] = {"timetable": type(dag.timetable).__name__, "cron": getattr(dag.timetable, "_expression", None),
                          "summary": dag.timetable.summary, "catchup": dag.catchup, "retries": task.retries,
                          "job": task.op_kwargs["job"], "template": template, "rendered": rendered,
                          "interval": [interval.start.isoformat(), interval.end.isoformat()]}
print("TOKENMILL_DAGS " + json.dumps(out))
"""


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RAY_ADDRESS"))}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS), AIRFLOW__CORE__LOAD_EXAMPLES="False",
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
import importlib.util, sys
spec = importlib.util.spec_from_file_location("nightly", sys.argv[1])
dags = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dags)
try:
    print("POLL", dags._poll_s())
except ValueError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize(("value", "expected"), [
    ("2.5", "POLL 2.5"),
    ("soon", "REFUSED Airflow Variable tokenmill_poll_s: 'soon' is not a number of seconds above zero"),
    ("0", "REFUSED Airflow Variable tokenmill_poll_s: '0' is not a number of seconds above zero"),
])
def test_the_poll_interval_variable_is_seconds_above_zero_or_refused_by_name(airflow_home, value, expected):
    done = subprocess.run([str(AIRFLOW_VENV / "bin/python"), "-c", POLL, str(DAGS / "tokenmill_nightly.py")],
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
    env = airflow_env(airflow_home, AIRFLOW_VAR_TOKENMILL_RAY_ADDRESS=ray_nodes.address,
                      AIRFLOW_VAR_TOKENMILL_OVERRIDES=json.dumps(overrides), AIRFLOW_VAR_TOKENMILL_POLL_S="1")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the cluster holds them; Airflow needs none
        env.pop(key, None)
    # A run at 02:00 the morning after NIGHT: its data interval is NIGHT 02:00 to 02:00, its partition NIGHT.
    task = [str(AIRFLOW_VENV / "bin/airflow"), "tasks", "test", "tokenmill_nightly_ticket_triage", "submit",
            "2026-11-27T02:00:00+00:00"]
    first = subprocess.run(task, env=env, capture_output=True, text=True, timeout=900)
    log = first.stdout + first.stderr
    (airflow_home / "first-task.log").write_text(log)
    # `airflow tasks test` exits 0 even when the task fails: the task's own end state says.
    assert first.returncode == 0 and "new_state=success" in log, log[-5000:]
    assert f"submitted tokenmill-ticket_triage-{NIGHT}" in log and "SUCCEEDED" in log

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
