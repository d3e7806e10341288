"""Nightly tokenmill runs: one DAG per job spec in conf/jobs/, submitted to a Ray cluster's Jobs API.

Each DAG runs once a night for the interval that just ended and passes that
interval's start (`data_interval_start`, as YYYY-MM-DD) as the partition: it
becomes `--date`, fills `{date}` in the job's input and output paths, and is part
of the submission id. The task submits through `pipelines.run.submit`, the same code
as `tokenmill submit`, and waits for the job by polling it, following its logs.
A retry of the task finds the night's submission by its id: it re-attaches to a
running one, does nothing after a succeeded one, and only after a failed one
submits the next attempt, whose run resumes what the failed one committed.

Settings (Airflow Variables, or `AIRFLOW_VAR_<NAME>` environment variables):
    tokenmill_ray_address   the Jobs API, e.g. http://ray-head.tokenmill:8265
    tokenmill_overrides     JSON: {"<job>": ["input.path=s3://bucket/tickets/{date}/", ...]} (optional)
    tokenmill_repo          the tokenmill checkout to import and upload (default: this file's repository)
    tokenmill_poll_s        seconds between looks at the job's state (default 15)

Credentials never pass through here: the cluster's nodes hold them (see the README).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path

from airflow.sdk import DAG, Variable, task
from airflow.timetables.interval import CronDataIntervalTimetable

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


def _poll_s() -> float:
    raw = Variable.get("tokenmill_poll_s", default="15")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"Airflow Variable tokenmill_poll_s: {raw!r} is not a number of seconds above zero")
    return value


def submit_night(job: str, partition: str) -> str:
    """Submit (or find, or re-attach to) `job` for `partition` and wait; fail the task unless it succeeded."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pipelines.run.submit import submit

    overrides = json.loads(Variable.get("tokenmill_overrides", default="{}") or "{}").get(job, [])
    done = submit(address=Variable.get("tokenmill_ray_address"), job=job, partition=partition,
                  args=[a for kv in overrides for a in ("--set", kv)], runtime_env=_runtime_env(), wait=True,
                  poll_s=_poll_s())
    if done.status != "SUCCEEDED":
        raise RuntimeError(f"{done.submission_id} ended {done.status}; see its logs above")
    return done.submission_id


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
        task(task_id="submit", execution_timeout=dt.timedelta(hours=8))(submit_night)(
            job=_job, partition="{{ data_interval_start | ds }}")
    globals()[_dag.dag_id] = _dag
