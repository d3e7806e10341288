"""tokenmill's Airflow operator and trigger: submit a night to a Ray cluster, then wait without a worker slot.

The operator submits through `pipelines.run.submit` (the code of `tokenmill
submit`), then defers to `RayJobTrigger`, which watches the Ray job from the
triggerer. The cluster's address and Ray token come from an Airflow Connection
(default `tokenmill_ray`: host and port of the Jobs API, the token as password).
A task killed by a user stops the Ray job (the operator's and the trigger's
`on_kill`); a task past its `execution_timeout` stops it too (the trigger's deadline).
A night that ends on a breached drift gate or a spent budget fails the task without
a retry; any other failure is retried (a retry resumes the night's committed shards).

The module is a plugin (it goes in Airflow's plugins folder) because the triggerer
imports the trigger by its class path, and Airflow puts the plugins folder, not the
DAG folder, on every component's path.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook, BaseOperator, Variable
from airflow.sdk.exceptions import AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def _repo_on_path(repo: str) -> None:
    if repo not in sys.path:
        sys.path.insert(0, repo)


def poll_seconds() -> float:
    """The Variable `tokenmill_poll_s` (default 15), refused by name unless it is seconds above zero."""
    raw = Variable.get("tokenmill_poll_s", default="15")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"Airflow Variable tokenmill_poll_s: {raw!r} is not a number of seconds above zero")
    return value


def overrides_for(job: str) -> list[str]:
    """The job's `--set` values from the Variable `tokenmill_overrides` (JSON: {job: [key=value, ...]})."""
    return json.loads(Variable.get("tokenmill_overrides", default="{}") or "{}").get(job, [])


def cluster(conn_id: str) -> tuple[str, str | None]:
    """(the Jobs API address, the Ray token) from the Connection `conn_id`."""
    conn = BaseHook.get_connection(conn_id)
    host = conn.host or ""
    if "://" not in host:
        host = f"{conn.schema or 'http'}://{host}"
    address = f"{host}:{conn.port}" if conn.port else host
    return address, conn.password or None


class RayJobTrigger(BaseTrigger):
    """Fires when the Ray job `submission_id` ends, or stops it and fires at `deadline` (seconds since the epoch)."""

    def __init__(self, *, conn_id: str, submission_id: str, repo: str, poll_s: float, deadline: float | None):
        super().__init__()
        self.conn_id, self.submission_id, self.repo = conn_id, submission_id, repo
        self.poll_s, self.deadline = poll_s, deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("tokenmill_ray.RayJobTrigger", {"conn_id": self.conn_id, "submission_id": self.submission_id,
                                                "repo": self.repo, "poll_s": self.poll_s, "deadline": self.deadline})

    def _client(self):
        _repo_on_path(self.repo)
        from pipelines.run.submit import connect

        return connect(*cluster(self.conn_id))

    async def run(self):
        client = await asyncio.to_thread(self._client)
        while True:
            status = str(getattr(s := await asyncio.to_thread(client.get_job_status, self.submission_id),
                                 "value", s))
            if status in DONE:
                break
            if self.deadline is not None and time.time() > self.deadline:
                await asyncio.to_thread(client.stop_job, self.submission_id)
                status = "TIMED_OUT"
                break
            await asyncio.sleep(self.poll_s)
        logs = await asyncio.to_thread(client.get_job_logs, self.submission_id)
        info = await asyncio.to_thread(client.get_job_info, self.submission_id)
        yield TriggerEvent({"submission_id": self.submission_id, "status": status, "logs": logs[-20000:],
                            "exit_code": getattr(info, "driver_exit_code", None)})

    async def on_kill(self) -> None:
        client = await asyncio.to_thread(self._client)
        await asyncio.to_thread(client.stop_job, self.submission_id)


class TokenmillNightOperator(BaseOperator):
    """Run `job` for the night `partition` on the Ray cluster of Connection `conn_id`, exactly once."""

    template_fields = ("partition",)

    def __init__(self, *, job: str, partition: str, repo: str, conn_id: str = "tokenmill_ray",
                 runtime_env: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.job, self.partition, self.repo, self.conn_id = job, partition, repo, conn_id
        self.runtime_env = runtime_env or {}
        self.submission_id: str | None = None

    def execute(self, context):
        _repo_on_path(self.repo)
        from pipelines.run.submit import ClusterUnreachable, SubmitError, submit

        poll_s, overrides = poll_seconds(), overrides_for(self.job)  # read when the task runs, not at parse time
        address, token = cluster(self.conn_id)
        spec = Path(self.repo, "conf/jobs", f"{self.job}.yaml").read_text()
        try:
            done = submit(address=address, token=token, spec_text=spec, partition=self.partition,
                          args=[a for kv in overrides for a in ("--set", kv)], runtime_env=self.runtime_env,
                          wait=False, echo=self.log.info)
        except ClusterUnreachable as exc:
            raise RuntimeError(str(exc)) from None  # retried: the cluster may answer later
        except SubmitError as exc:
            # A refusal (a credential in the overrides, a bad night): no retry, which would only be refused again.
            raise AirflowFailException(str(exc)) from None
        self.submission_id = done.submission_id
        if done.status == "SUCCEEDED":
            return done.submission_id
        timeout = self.execution_timeout
        deadline = time.time() + timeout.total_seconds() if isinstance(timeout, dt.timedelta) else None
        self.log.info("waiting for %s in the triggerer (no worker slot held)", done.submission_id)
        self.defer(trigger=RayJobTrigger(conn_id=self.conn_id, submission_id=done.submission_id, repo=self.repo,
                                         poll_s=poll_s, deadline=deadline),
                   method_name="execute_complete")

    def execute_complete(self, context, event: dict[str, Any]):
        _repo_on_path(self.repo)
        from pipelines.errors import BudgetSpent, GateFailed

        self.log.info("%s", event["logs"])
        code = event.get("exit_code")
        self.log.info("tokenmill submit: %s ended %s%s", event["submission_id"], event["status"],
                      f" (exit code {code})" if code is not None else "")
        if event["status"] == "SUCCEEDED":
            return event["submission_id"]
        # A breached gate or a spent budget is a verdict on this night, not a fault: a retry would only reach
        # it again, so the task fails without one, saying which, with tokenmill's own line from the logs.
        said = next((ln for ln in reversed(event["logs"].splitlines()) if ln.startswith("tokenmill: error:")), "")
        if code == GateFailed.exit_code:
            raise AirflowFailException(f"{event['submission_id']}: drift gate breached, not retried. {said}")
        if code == BudgetSpent.exit_code:
            raise AirflowFailException(f"{event['submission_id']}: budget spent, not retried (raise budget.max_usd "
                                       f"or budget.max_output_tokens and clear the task to resume). {said}")
        raise RuntimeError(f"{event['submission_id']} ended {event['status']}; see its logs above")

    def on_kill(self) -> None:
        if self.submission_id:
            _repo_on_path(self.repo)
            from pipelines.run.submit import connect

            connect(*cluster(self.conn_id)).stop_job(self.submission_id)
