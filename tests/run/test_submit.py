"""`tokenmill submit` against a real local Ray head (`ray start --head` on 127.0.0.1), with input and output in
S3 and credentials that reach the job only through the cluster's environment."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import S3_KEY, S3_SECRET, jobs_api

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
BUCKET = "tokenmill-submit"
NIGHT = "2026-11-27"


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
              "--runtime-env", str(REPO / "conf/runtime_env.yaml"), "--timeout", "900", "--poll", "1",
              "--set", f"input.path=s3://{BUCKET}/tickets/{{date}}/", "--set", f"output.path=s3://{BUCKET}/triage/",
              "--set", "sampling.max_tokens=8"]
    # (The spec is checked where the command runs, before submitting: s3_env gives this process the store too.)
    assert main(submit) == 0, capsys.readouterr().out[-4000:]
    first = capsys.readouterr().out
    assert f"submitted tokenmill-ticket_triage-{NIGHT}" in first
    assert f"tokenmill-ticket_triage-{NIGHT} ended SUCCEEDED" in first

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
    assert [j.submission_id for j in jobs if j.submission_id.startswith(f"tokenmill-ticket_triage-{NIGHT}")] == \
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
