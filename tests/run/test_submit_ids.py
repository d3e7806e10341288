"""`pipelines.run.submit` without a cluster: submission ids, entry points, what runtime_env may carry, the token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pipelines.run.submit import (
    SPEC_ENV,
    SubmitError,
    _attempt_of,
    auth_headers,
    check_partition,
    check_runtime_env,
    check_spec,
    entrypoint,
    submission_id,
)

REPO = Path(__file__).resolve().parents[2]
CANARY = "tm-canary-spec-8c1e"


def test_submission_ids_are_derived_from_job_and_night():
    assert submission_id("ticket_triage", "2026-11-27") == "tokenmill-ticket_triage-2026-11-27"
    assert submission_id("ticket_triage", "2026-11-27", attempt=3) == "tokenmill-ticket_triage-2026-11-27-retry3"
    base = submission_id("ticket_triage", "2026-11-27")
    assert _attempt_of(base, base) == 1 and _attempt_of(f"{base}-retry2", base) == 2
    assert _attempt_of("tokenmill-ticket_triage-2026-11-28", base) is None
    assert _attempt_of(f"{base}-other", base) is None
    with pytest.raises(SubmitError, match="expected a date as YYYY-MM-DD"):
        check_partition("yesterday")


def test_entrypoint_runs_the_shipped_spec_named_by_its_digest():
    text = (REPO / "conf/jobs/ticket_triage.yaml").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert entrypoint(text, "2026-11-27", ["--set", "input.path=s3://b/{date}/"]) == \
        f"python -m jobs.shipped --spec-sha256 {digest} --date 2026-11-27 --set 'input.path=s3://b/{{date}}/'"


def test_a_spec_holding_a_credential_is_refused_before_contacting_the_cluster(tmp_path, capsys):
    from conftest import _free_port

    from pipelines.cli import main

    spec = yaml.safe_load((REPO / "conf/jobs/ticket_triage.yaml").read_text())
    spec["storage"] = {"secret_access_key": CANARY}
    (tmp_path / "ticket_triage.yaml").write_text(yaml.safe_dump(spec))
    nobody = f"http://127.0.0.1:{_free_port()}"
    code = main(["submit", str(tmp_path / "ticket_triage.yaml"), "--date", "2026-11-27", "--address", nobody])
    printed = capsys.readouterr()
    assert code == 2 and "job spec: storage.secret_access_key: a credential in the spec" in printed.err, printed.err
    assert CANARY not in printed.err + printed.out
    assert check_spec(yaml.safe_dump({"name": "x", "storage": {"secret_access_key": None}}))["name"] == "x"


def test_the_shipped_spec_runs_not_the_one_of_the_same_name(ray_cluster, tmp_path, monkeypatch, capsys):
    """`jobs.shipped` runs the spec that came with the job (here: other max_tokens and output than
    conf/jobs/ticket_triage.yaml), and refuses one whose digest is not the entrypoint's."""
    from jobs.shipped import main

    spec = yaml.safe_load((REPO / "conf/jobs/ticket_triage.yaml").read_text())
    spec["input"]["path"] = str(REPO / "data/samples/tickets")
    spec["output"]["path"] = str(tmp_path / "out")
    spec["sampling"]["max_tokens"] = 3
    text = yaml.safe_dump(spec)
    monkeypatch.setenv(SPEC_ENV, text)
    assert main(["--spec-sha256", "0" * 64, "--date", "2026-11-27"]) == 2
    assert "is not the one submitted" in capsys.readouterr().err
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert main(["--spec-sha256", digest, "--date", "2026-11-27", "--set", "engine=stand-in", "--no-progress"]) == 0
    [done] = list((tmp_path / "out").glob("*/summary.json"))
    summary = json.loads(done.read_text())
    assert summary["records_in"] == summary["records_out"] + summary["records_rejected"] > 0
    assert json.loads((done.parent / "_run.json").read_text())["snapshot"]["spec"]["sampling"]["max_tokens"] == 3


def test_credentials_are_refused_in_runtime_env():
    ok = {"working_dir": ".", "env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "HF_HOME": "/models"}}
    assert check_runtime_env(ok) == ok
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "DB_PASSWORD", "OPENAI_API_KEY"):
        with pytest.raises(SubmitError, match=f"runtime_env.env_vars: {name} look like credentials"):
            check_runtime_env({"env_vars": {name: "x"}})


def test_auth_token_is_read_as_ray_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert auth_headers() == {"Authorization": "Bearer abc"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_headers() == {}


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_poll_interval_that_is_not_seconds_above_zero_is_refused_by_name(value, capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["submit", "conf/jobs/ticket_triage.yaml", "--date", "2026-11-27", "--poll", value])
    assert exited.value.code == 2
    assert f"argument --poll: {value!r}" in capsys.readouterr().err


def test_keys_that_name_credentials_are_told_from_counts_and_switches():
    from pipelines.run.submit import secret_key

    for key in ("storage.secret_access_key", "storage.access_key_id", "storage.session_token", "engine.env.HF_TOKEN",
                "storage.extra.password", "storage.extra.client_kwargs.aws_secret_access_key", "engine.env.API_KEY",
                "storage.extra.account_key", "storage.extra.sas_key", "engine.env.OPENAI_APIKEY"):
        assert secret_key(key), key
    for key in ("sampling.max_tokens", "output.include_token_ids", "input.id_column", "output.path", "batch_size",
                "cache.path", "engine", "lora.path", "storage.endpoint_url", "sampling.stop"):
        assert not secret_key(key), key


@pytest.mark.parametrize("key", ["storage.secret_access_key", "storage.extra.token", "storage.extra.password"])
def test_submit_refuses_a_credential_in_set_before_contacting_the_cluster(key, capsys):
    from conftest import _free_port

    from pipelines.cli import main

    canary = "canary-d0-not-print-7f3a"
    nobody = f"http://127.0.0.1:{_free_port()}"  # nothing listens: the refusal must come first
    code = main(["submit", "conf/jobs/ticket_triage.yaml", "--date", "2026-11-27", "--address", nobody,
                 "--set", f"{key}={canary}"])
    printed = capsys.readouterr()
    assert code == 2 and f"--set {key}: looks like a credential" in printed.err
    assert "does not answer" not in printed.err and canary not in printed.err + printed.out


def test_a_cluster_that_does_not_answer_is_one_line_naming_it(capsys):
    from conftest import _free_port

    from pipelines.cli import main

    nobody = f"http://127.0.0.1:{_free_port()}"
    code = main(["submit", "conf/jobs/ticket_triage.yaml", "--date", "2026-11-27", "--address", nobody, "--no-wait"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"the Ray cluster at {nobody} does not answer: check --address" in err


def test_run_with_a_ray_address_where_nothing_answers_is_one_line():
    """In a process of its own: this one may already be connected to the session's cluster."""
    import os
    import subprocess
    import sys
    import time

    from conftest import _free_port

    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "conf/jobs/ticket_triage.yaml",
                           "--set", "engine=stand-in", "--no-progress"], env={**os.environ, "RAY_ADDRESS": address},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"RAY_ADDRESS={address}: nothing answers there" in done.stderr
    assert time.monotonic() - started < 60  # ray.init alone retried for minutes


def test_submit_imports_without_the_data_stack():
    """The Airflow DAG imports `pipelines.run.submit` in Airflow's own environment, which has neither pyarrow nor
    Ray Data: importing it must not pull them in (the DAG test on real Airflow found this once)."""
    import subprocess
    import sys

    blocked = "import sys\nfor m in ('pyarrow', 'polars', 'pydantic', 'vllm', 'torch'): sys.modules[m] = None\n"
    done = subprocess.run([sys.executable, "-c", blocked + "import pipelines.run.submit"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
