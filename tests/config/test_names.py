"""The night and the run id are checked where they come in: one spelling of a night, one folder for a run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config.load import load_job
from pipelines.errors import ConfigError
from pipelines.names import night_problem, run_id_problem
from pipelines.run.submit import SubmitError, check_partition

JOB = Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml"
# Python's date parser reads the first three as 2026-11-27: each would name another run of the same night.
NOT_NIGHTS = ["20261127", "2026-W48-5", "2026-331", "2026-11-27T02:00", "2026-11-31", "27/11/2026", "", " 2026-11-27"]


def test_a_night_is_written_yyyy_mm_dd_and_is_a_real_day():
    assert night_problem("2026-11-27") is None and night_problem("2028-02-29") is None
    for text in NOT_NIGHTS:
        assert night_problem(text), text
    assert night_problem("2026-11-31") == "--date '2026-11-31': no such day"


@pytest.mark.parametrize("text", NOT_NIGHTS[:3])
def test_every_command_refuses_another_spelling_of_a_night(text, capsys):
    with pytest.raises(ConfigError, match="expected a date as YYYY-MM-DD"):
        load_job(JOB, partition=text)
    with pytest.raises(SubmitError, match="expected a date as YYYY-MM-DD"):
        check_partition(text)  # before any cluster is contacted
    assert main(["check", str(JOB), "--date", text]) == 2
    assert f"--date {text!r}: expected a date as YYYY-MM-DD" in capsys.readouterr().err


def test_a_run_id_is_one_safe_folder_name():
    for good in ("e2e", "ticket_triage-2026-11-27-0123456789", "night=2026-11-27", "a.b", "A" * 128):
        assert run_id_problem(good) is None, good
    for bad in ("../other-run", "a/b", "a\\b", ".hidden", "a..b", "", "A" * 129, "run id", "s3://b/x", "-x"):
        assert run_id_problem(bad), bad


@pytest.mark.parametrize("run_id", ["../../elsewhere", "nested/run", ".."])
def test_tokenmill_run_refuses_an_unsafe_run_id_before_any_work(run_id, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", str(JOB), "--run-id", run_id, "--no-progress", "--set", f"output.path={out}",
                 "--set", "engine=stand-in"])
    assert code == 2
    assert f"--run-id {run_id!r}: use 1 to 128 letters" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "elsewhere").exists()
