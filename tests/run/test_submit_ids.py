"""`pipelines.run.submit` without a cluster: submission ids, entry points, what runtime_env may carry, the token."""

from __future__ import annotations

import pytest

from pipelines.run.submit import (
    SubmitError,
    _attempt_of,
    auth_headers,
    check_partition,
    check_runtime_env,
    entrypoint,
    submission_id,
)


def test_submission_ids_are_derived_from_job_and_night():
    assert submission_id("ticket_triage", "2026-11-27") == "tokenmill-ticket_triage-2026-11-27"
    assert submission_id("ticket_triage", "2026-11-27", attempt=3) == "tokenmill-ticket_triage-2026-11-27-retry3"
    base = submission_id("ticket_triage", "2026-11-27")
    assert _attempt_of(base, base) == 1 and _attempt_of(f"{base}-retry2", base) == 2
    assert _attempt_of("tokenmill-ticket_triage-2026-11-28", base) is None
    assert _attempt_of(f"{base}-other", base) is None
    with pytest.raises(SubmitError, match="expected a date as YYYY-MM-DD"):
        check_partition("yesterday")


def test_entrypoint_is_the_job_module_with_the_night():
    assert entrypoint("ticket_triage", "2026-11-27", ["--set", "input.path=s3://b/{date}/"]) == \
        "python -m jobs.ticket_triage --date 2026-11-27 --set 'input.path=s3://b/{date}/'"
    # A spec without its own entry module goes through the CLI.
    assert entrypoint("my_job", "2026-11-27", []) == \
        "python -m pipelines.cli run conf/jobs/my_job.yaml --date 2026-11-27"


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
