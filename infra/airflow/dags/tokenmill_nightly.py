"""Nightly tokenmill runs: one DAG per job spec in conf/jobs/, submitted to a Ray cluster's Jobs API.

Each DAG runs once a night for the interval that just ended and passes that
interval's start (`data_interval_start`, as YYYY-MM-DD) as the partition: it
becomes `--date`, fills `{date}` in the job's input and output paths, and is part
of the submission id. The task (`tokenmill_ray.TokenmillNightOperator`) submits
through `pipelines.run.submit`, the same code as `tokenmill submit`, shipping the
job spec it read with the job, then defers: the triggerer watches the Ray job, and
no worker slot is held for the hours it runs. A user killing the task, or the task
passing its execution_timeout, stops the Ray job. A retry of the task finds the
night's submission by its id: it re-attaches to a running one, does nothing after a
succeeded one, and only after a failed one submits the next attempt, whose run
resumes what the failed one committed.

The cluster: the Airflow Connection `tokenmill_ray` (host and port of the Jobs API;
the cluster's Ray token as its password), e.g. from a secrets backend, or
    AIRFLOW_CONN_TOKENMILL_RAY='{"conn_type": "http", "host": "ray-head.tokenmill", "port": 8265,
                                 "password": "<the token from the tokenmill-ray-auth secret>"}'

Settings (Airflow Variables, or `AIRFLOW_VAR_<NAME>` environment variables):
    tokenmill_overrides     JSON: {"<job>": ["input.path=s3://bucket/tickets/{date}/", ...]} (optional)
    tokenmill_repo          the tokenmill checkout to import and upload (default: this file's repository)
    tokenmill_poll_s        seconds between looks at the job's state (default 15)

Credentials for the data never pass through here: the cluster's nodes hold them (see the README).
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from airflow.sdk import DAG
from airflow.timetables.interval import CronDataIntervalTimetable
from tokenmill_ray import TokenmillNightOperator

REPO = Path(os.environ.get("AIRFLOW_VAR_TOKENMILL_REPO") or Path(__file__).resolve().parents[3])
SCHEDULE = "0 2 * * *"  # 02:00 UTC: the interval is the day before


def _jobs() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf/jobs").glob("*.yaml"))


def _runtime_env() -> dict:
    import yaml

    path = REPO / "conf/runtime_env.yaml"
    env = yaml.safe_load(path.read_text()) if path.is_file() else {}
    env["working_dir"] = str(REPO / env.get("working_dir", "."))
    return env


for _job in _jobs():
    with DAG(
        dag_id=f"tokenmill_nightly_{_job}",
        description=f"tokenmill: conf/jobs/{_job}.yaml for the night that just ended",
        schedule=CronDataIntervalTimetable(SCHEDULE, timezone="UTC"),
        start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
        tags=["tokenmill"],
    ) as _dag:
        TokenmillNightOperator(
            task_id="submit", job=_job, partition="{{ data_interval_start | ds }}", repo=str(REPO),
            runtime_env=_runtime_env(), execution_timeout=dt.timedelta(hours=8))
    globals()[_dag.dag_id] = _dag
