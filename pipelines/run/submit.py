"""`tokenmill submit`: a job for one partition (a night) to a Ray cluster's Jobs API, exactly once.

The submission id is derived from the job and the partition, so a second
submission of the same night finds the first: if it succeeded nothing is
submitted, if it is still running the caller re-attaches to it and waits. Only
after a failed or stopped attempt is a new one submitted (`-retry<N>`), and that
attempt's run resumes the failed one's committed shards (`pipelines.run.runner`).

This module needs only Ray's job client and the standard library, so a
scheduler's environment (Airflow's, `infra/airflow/`) can import it without the
rest of tokenmill.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.names import night_problem
from pipelines.paths import REPO_DIR

REPO = REPO_DIR
DONE = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment variables that look like credentials: never sent as runtime_env values, which Ray logs and shows.
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE|API_KEY)", re.I)


class SubmitError(Exception):
    """A submission that cannot be made; the message says why."""


class ClusterUnreachable(SubmitError):
    """The cluster does not answer or refuses the token: unlike a refusal, worth trying again later."""


@dataclass
class Submission:
    submission_id: str
    status: str
    submitted: bool  # False: an earlier submission of this night was found and followed instead


def check_partition(partition: str) -> str:
    problem = night_problem(partition)
    if problem:
        raise SubmitError(problem)
    return partition


def submission_id(job: str, partition: str, attempt: int = 1) -> str:
    """`tokenmill-<job>-<partition>`, then `-retry2`, `-retry3`... for attempts after a failed one."""
    base = f"tokenmill-{job}-{partition}"
    return base if attempt == 1 else f"{base}-retry{attempt}"


def _status(status) -> str:
    return str(getattr(status, "value", status))


def _attempt_of(sid: str, base: str) -> int | None:
    if sid == base:
        return 1
    m = re.fullmatch(re.escape(base) + r"-retry(\d+)", sid)
    return int(m.group(1)) if m else None


#: The runtime_env variable that carries the checked job spec to the cluster (`jobs.shipped` reads it).
SPEC_ENV = "TOKENMILL_JOB_SPEC"


def spec_digest(spec_text: str) -> str:
    return hashlib.sha256(spec_text.encode()).hexdigest()


def entrypoint(spec_text: str, partition: str, args: list[str]) -> str:
    """`python -m jobs.shipped --spec-sha256 <digest> --date <partition> ...`: the job runs the spec shipped with
    it (`SPEC_ENV`), which it checks against the digest, never a spec looked up again by name on the cluster."""
    return shlex.join(["python", "-m", "jobs.shipped", "--spec-sha256", spec_digest(spec_text),
                       "--date", partition, *args])


def check_spec(spec_text: str) -> dict[str, Any]:
    """The spec as a mapping, refused when it holds a value under a credential's key: the spec travels in the
    job's runtime_env, which Ray records and shows."""
    import yaml

    try:
        data = yaml.safe_load(spec_text)
    except yaml.YAMLError as exc:
        raise SubmitError(f"the job spec is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise SubmitError("the job spec must be a mapping with a `name`")

    def keys(value: Any, prefix: str):
        if isinstance(value, dict):
            for k, v in value.items():
                yield from keys(v, f"{prefix}{k}.")
        elif value not in (None, ""):
            yield prefix.rstrip(".")

    found = sorted(k for k in keys(data, "") if secret_key(k))
    if found:
        raise SubmitError(f"job spec: {', '.join(found)}: a credential in the spec would travel with the job, "
                          "which Ray shows; give credentials to the cluster's nodes instead (a Kubernetes secret "
                          "as environment variables, an instance role)")
    return data


# Spec keys whose values are credentials, by their dotted and underscored parts.
_SECRET_PARTS = {"secret", "password", "passwd", "credential", "credentials", "token", "apikey", "accesskey"}
_KEY_OWNERS = {"access", "api", "private", "secret", "account", "sas", "session"}


def secret_key(key: str) -> bool:
    """Whether a spec key (`storage.secret_access_key`, `engine.env.HF_TOKEN`) names a credential; counts such as
    `sampling.max_tokens` and switches such as `output.include_token_ids` do not."""
    parts = [p for p in re.split(r"[._\-]+", key.lower()) if p]
    if not parts:
        return False
    if any(p in ("secret", "password", "passwd", "credential", "credentials") for p in parts):
        return True
    if parts[-1] in _SECRET_PARTS:
        return True
    return any(a in _KEY_OWNERS and b == "key" for a, b in zip(parts, parts[1:]))


def check_args(args: list[str]) -> list[str]:
    """Refuse `--set` of a credential: the arguments become the job's entrypoint, which Ray shows in `ray job
    list`, the dashboard and the logs. The value is never repeated."""
    for flag, value in zip(args, args[1:]):
        key = value.partition("=")[0].strip()
        if flag == "--set" and secret_key(key):
            raise SubmitError(f"--set {key}: looks like a credential, and a job's "
                              "arguments are shown in `ray job list`, the dashboard and the logs; give "
                              "credentials to the cluster's nodes instead (a Kubernetes secret as environment "
                              "variables, an instance role)")
    return args


def connect(address: str, token: str | None = None):
    """A Jobs API client for `address`, with `token` or else the token Ray would read here (`auth_headers`); a
    cluster that does not answer, or refuses the token, is a one-line `SubmitError` that names the address, not a
    traceback."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else auth_headers()
    try:
        return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        refused = any(w in said.lower() for w in ("unauthorized", "401", "403", "token"))
        what = ("refused this machine's Ray token: set RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the cluster's"
                if refused else "does not answer: check --address (or RAY_ADDRESS) and that the head's dashboard "
                "port is reachable from here")
        raise ClusterUnreachable(f"the Ray cluster at {address} {what} ({type(exc).__name__}: {said})") from None


def check_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Refuse credentials in `env_vars`: Ray records a job's runtime_env in its logs and dashboard."""
    bad = sorted(k for k in (runtime_env.get("env_vars") or {}) if SECRET_NAME.search(k))
    if bad:
        raise SubmitError(f"runtime_env.env_vars: {', '.join(bad)} look like credentials; Ray logs runtime_env "
                          "values, so give credentials to the cluster's nodes instead (a Kubernetes secret as "
                          "environment variables, an instance role); see the README")
    return runtime_env


def submit(*, address: str, spec_text: str, partition: str, args: list[str] | None = None,
           runtime_env: dict[str, Any] | None = None, wait: bool = True, poll_s: float = 5.0,
           timeout_s: float | None = None, echo: Callable[[str], None] = print,
           token: str | None = None) -> Submission:
    """Submit the job `spec_text` describes for `partition` unless this night already has a submission; wait for
    the end if asked.

    Args:
        address: The cluster's Jobs API, e.g. `http://ray-head:8265`.
        spec_text: The job spec (YAML) as checked here; it travels with the job and is what runs.
        partition: The night, `YYYY-MM-DD`: passed as `--date`, and part of the submission id.
        args: More arguments for the entry point (`--set key=value`, ...).
        runtime_env: Ray's runtime_env (working_dir, excludes, non-secret env_vars).
        wait: Follow the job's logs (through `echo`) until it ends.
        token: The cluster's Ray token (an Airflow Connection's password); default the one Ray reads here.
    """
    # Everything that can be refused is, before the cluster is contacted.
    check_partition(partition)
    check_args(list(args or []))
    job = check_spec(spec_text)["name"]
    env = check_runtime_env(dict(runtime_env or {}))
    env["env_vars"] = {**(env.get("env_vars") or {}), SPEC_ENV: spec_text}
    client = connect(address, token)
    sid, submitted = find_or_submit(client, job=job, partition=partition, spec_text=spec_text, args=args, env=env,
                                    echo=echo)
    if not submitted and _status(client.get_job_status(sid)) == "SUCCEEDED":
        return Submission(sid, "SUCCEEDED", submitted)
    if not wait:
        return Submission(sid, _status(client.get_job_status(sid)), submitted)
    status = follow(client, sid, poll_s=poll_s, timeout_s=timeout_s, echo=echo)
    echo(f"tokenmill submit: {sid} ended {status}")
    return Submission(sid, status, submitted)


def find_or_submit(client, *, job: str, partition: str, spec_text: str, args: list[str] | None,
                   env: dict[str, Any], echo: Callable[[str], None]) -> tuple[str, bool]:
    """This night's live or succeeded submission, or a new attempt after a failed one: (its id, whether it is new)."""
    base = submission_id(job, partition)
    attempts = sorted((a, j.submission_id, _status(j.status)) for j in client.list_jobs() if j.submission_id
                      and (a := _attempt_of(j.submission_id, base)) is not None)
    latest = attempts[-1] if attempts else None
    if latest is not None and latest[2] in ("SUCCEEDED", "PENDING", "RUNNING"):
        _, sid, status = latest
        echo(f"tokenmill submit: {sid} is {status}: "
             + ("this night already ran; nothing submitted" if status == "SUCCEEDED" else "following it"))
        return sid, False
    attempt = attempts[-1][0] + 1 if attempts else 1
    sid = submission_id(job, partition, attempt)
    _submit_job(client, entrypoint=entrypoint(spec_text, partition, list(args or [])), submission_id=sid,
                runtime_env=env, metadata={"tokenmill_job": job, "partition": partition,
                                           "spec_sha256": spec_digest(spec_text)})
    echo(f"tokenmill submit: submitted {sid}" + (f" (attempt {attempt})" if attempt > 1 else ""))
    return sid, True


def _submit_job(client, *, patience_s: float = 120.0, **kwargs) -> None:
    """`submit_job`, waiting out a head that is up but whose job agent is not yet (a cluster just started)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def follow(client, sid: str, *, poll_s: float, timeout_s: float | None, echo: Callable[[str], None]) -> str:
    """Print the job's new log lines until it ends; its final status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        status = _status(client.get_job_status(sid))
        logs = client.get_job_logs(sid)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in DONE:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"{sid} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def auth_headers() -> dict[str, str]:
    """Ray's token for the Jobs API, where there is one: new Ray clusters require it (token authentication).

    Read as Ray reads it: `$RAY_AUTH_TOKEN`, the file at `$RAY_AUTH_TOKEN_PATH`,
    or `~/.ray/auth_token`; `RAY_AUTH_MODE=disabled` sends none.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def default_address() -> str:
    return os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
