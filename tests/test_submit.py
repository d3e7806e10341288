"""`tokenmill submit` against a real local Ray head (`ray start --head` on 127.0.0.1), with input and output in
S3 and credentials that reach the job only through the cluster's environment."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main

from conftest import S3_KEY, S3_SECRET

REPO = Path(__file__).resolve().parents[1]
BUCKET = "tokenmill-submit"
NIGHT = "2026-11-27"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A Ray head of its own (GCS, raylet, dashboard with the Jobs API) on 127.0.0.1; stopped afterwards.

    Its environment carries the object-store credentials, as a Kubernetes secret
    or an instance role would on a real cluster.
    """
    temp = tmp_path_factory.mktemp("rayhead")
    dashboard = _port()
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
           "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "AWS_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    # --block keeps `ray start` in the foreground: its process group is the cluster, stopped by one signal
    # (`ray stop` would stop every Ray cluster on the machine, the test session's too).
    # Every port its own: the test session's Ray cluster runs beside this one.
    ports = [f"--{name}={_port()}" for name in (
        "port", "node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "ray-client-server-port")]
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", *ports, "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=open(temp / "ray-start.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                jobs_api(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start: {(temp / 'ray-start.log').read_text()[-3000:]}")
                time.sleep(1)
        yield {"address": address, "temp": temp}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        # Processes that left the group (the dashboard's) are found by the session folder they were given.
        subprocess.run(["pkill", "-f", str(temp)], check=False)


def jobs_api(address: str):
    """The Jobs API client, with the cluster's token (Ray clusters require one by default)."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.submit import auth_headers

    return JobSubmissionClient(address, headers=auth_headers())


def _upload(client) -> int:
    client.create_bucket(Bucket=BUCKET)
    table = pq.read_table(REPO / "data/samples/tickets").slice(0, 24)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    client.put_object(Bucket=BUCKET, Key=f"tickets/{NIGHT}/part-0.parquet", Body=buf.getvalue())
    return table.num_rows


def _objects(client, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


@pytest.mark.engine
def test_submit_runs_a_night_once_and_never_shows_credentials(ray_head, s3_env, model_path, capsys):
    client = s3_env.client()
    rows = _upload(client)
    submit = ["submit", str(REPO / "conf/jobs/ticket_triage.yaml"), "--date", NIGHT, "--address", ray_head["address"],
              "--runtime-env", str(REPO / "conf/runtime_env.yaml"), "--timeout", "900",
              "--set", f"input.path=s3://{BUCKET}/tickets/{{date}}/", "--set", f"output.path=s3://{BUCKET}/triage/"]
    # (The spec is checked where the command runs, before submitting: s3_env gives this process the store too.)
    assert main(submit) == 0, capsys.readouterr().out[-4000:]
    first = capsys.readouterr().out
    assert f"submitted tokenmill-ticket_triage-{NIGHT}" in first
    assert f"tokenmill-ticket_triage-{NIGHT}: SUCCEEDED" in first

    # The results are in S3, every record once.
    outputs = _objects(client, "triage/")
    (success,) = [k for k in outputs if k.endswith("/_SUCCESS")]
    run = success.rsplit("/", 1)[0]
    assert run.startswith(f"triage/ticket_triage-{NIGHT}-")
    summary = json.loads(outputs[f"{run}/summary.json"])
    results = pl.concat([pl.read_parquet(io.BytesIO(outputs[u.removeprefix(f"s3://{BUCKET}/")]))
                         for u in summary["output"]["results"]])
    assert summary["records_in"] == rows == results.height == results["ticket_id"].n_unique()
    assert results["error"].null_count() == rows

    # The same night again: recognised, nothing submitted.
    assert main(submit) == 0
    again = capsys.readouterr().out
    assert "already ran; nothing submitted" in again and "submitted tokenmill" not in again
    jobs = jobs_api(ray_head["address"]).list_jobs()
    assert [j.submission_id for j in jobs if j.submission_id.startswith("tokenmill-")] == \
        [f"tokenmill-ticket_triage-{NIGHT}"]

    # The credentials are in no job log, driver or worker log, output file, summary or report.
    logs = jobs_api(ray_head["address"]).get_job_logs(f"tokenmill-ticket_triage-{NIGHT}")
    assert "ticket_triage" in logs
    places = {"job log": logs.encode(), **{f"s3://{BUCKET}/{k}": v for k, v in _objects(client, "").items()}}
    files = [p for p in Path(ray_head["temp"]).rglob("*") if p.is_file() and not p.is_symlink()]
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
