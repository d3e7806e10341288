"""Input checks before any work: missing paths, unreadable shards, missing columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_job
from pipelines.errors import InputError
from pipelines.read import plan_input

JOB = Path(__file__).resolve().parents[1] / "conf/jobs/ticket_triage.yaml"
SAMPLES = Path(__file__).resolve().parents[1] / "data/samples/tickets"


def plan(path, *extra):
    job = load_job(JOB, overrides=[f"input.path={path}", *extra])
    return plan_input(job.spec, job.spec.storage.resolved())


def test_sample_input_is_planned_with_row_counts():
    p = plan(SAMPLES)
    assert len(p.shards) == 4 and p.num_rows == 300
    assert p.columns[0] == "ticket_id"


def test_missing_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"input\.path .*nowhere: no such file or folder"):
        plan(tmp_path / "nowhere")


def test_folder_without_parquet_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"holds no \.parquet files"):
        plan(tmp_path)


def test_unreadable_shard_is_named(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match=r"part-0\.parquet: not a readable Parquet file"):
        plan(tmp_path)


def test_missing_column_names_file_column_and_key(tmp_path):
    table = pq.read_table(SAMPLES / "part-00000.parquet").drop_columns(["body"])
    pq.write_table(table, tmp_path / "part-0.parquet")
    with pytest.raises(InputError) as err:
        plan(tmp_path)
    msg = str(err.value)
    assert "part-0.parquet" in msg and "'body'" in msg and "a prompt placeholder" in msg


def test_missing_id_column_names_the_key(tmp_path):
    pq.write_table(pa.table({"subject": ["s"], "body": ["b"], "channel": ["c"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"column 'ticket_id' \(input\.id_column\) is missing"):
        plan(tmp_path, "output.passthrough=[]")
