"""Input checks before any work: missing paths, unreadable shards, missing columns."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute below
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_job
from pipelines.config.storage import StorageOptions
from pipelines.errors import InputError
from pipelines.stages.read import find_duplicates, plan_input, read_dataset, read_shard_rows

JOB = Path(__file__).resolve().parents[2] / "conf/jobs/ticket_triage.yaml"
SAMPLES = Path(__file__).resolve().parents[2] / "data/samples/tickets"


def plan(path, *extra):
    job = load_job(JOB, overrides=[f"input.path={path}", *extra])
    return plan_input(job.spec, job.spec.storage.resolved())


def test_sample_input_is_planned_with_row_counts():
    p = plan(SAMPLES)
    assert len(p.shards) == 4 and p.num_rows == 300
    assert p.columns[0] == "ticket_id"


def test_dataset_streams_each_shard_in_blocks_of_the_batch_size(ray_cluster):
    """Blocks of one engine batch at most, each from one shard: the engine answers and the writer commits as
    the run goes, instead of whole shards at once (see `read_dataset`)."""
    p = plan(SAMPLES)
    blocks = list(read_dataset(p, rows_per_block=16, batch_rows=64).iter_batches(batch_size=None,
                                                                                  batch_format="pyarrow"))
    assert sum(b.num_rows for b in blocks) == 300 and max(b.num_rows for b in blocks) == 16
    assert all(len(set(b.column("_shard").to_pylist())) == 1 for b in blocks)
    rows = pa.concat_tables(blocks)
    assert sorted(zip(rows.column("_shard").to_pylist(), rows.column("_row").to_pylist())) == sorted(
        (s.key, r) for s in p.shards for r in range(s.num_rows))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"input\.path .*nowhere: no such file or folder"):
        plan(tmp_path / "nowhere")


def test_folder_without_parquet_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"holds no \.parquet files"):
        plan(tmp_path)


def test_unreadable_shard_is_named(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match=r"no usable shard: .*part-0\.parquet: unreadable: not a readable Parquet"):
        plan(tmp_path)


def test_missing_column_names_file_column_and_key(tmp_path):
    table = pq.read_table(SAMPLES / "part-00000.parquet").drop_columns(["body"])
    pq.write_table(table, tmp_path / "part-0.parquet")
    with pytest.raises(InputError) as err:
        plan(tmp_path)
    msg = str(err.value)
    assert "part-0.parquet" in msg and "'body'" in msg and "a prompt placeholder" in msg


def test_bad_shards_are_quarantined_and_safe_drift_is_cast(tmp_path):
    good = pq.read_table(SAMPLES / "part-00000.parquet").slice(0, 5)
    pq.write_table(good, tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    pq.write_table(good.drop_columns(["body"]), tmp_path / "c.parquet")
    numeric_ids = good.set_column(0, "ticket_id", pa.array(range(5), pa.int32()))  # cast to string: safe
    pq.write_table(numeric_ids, tmp_path / "d.parquet")
    float_body = good.set_column(good.schema.get_field_index("body"), "body", pa.array([1.5] * 5))
    pq.write_table(float_body, tmp_path / "e.parquet")  # a float read as text would be a misreading
    p = plan(tmp_path)
    assert [s.uri.rsplit("/", 1)[-1] for s in p.shards] == ["a.parquet", "d.parquet"]
    reasons = {q.uri.rsplit("/", 1)[-1]: q.reason for q in p.quarantined}
    assert reasons["b.parquet"].startswith("unreadable: not a readable Parquet file")
    assert reasons["c.parquet"].startswith("schema: column 'body' (a prompt placeholder) is missing")
    assert reasons["e.parquet"] == "schema: column 'body' is double here but string in the other shards"
    assert p.schema.field("ticket_id").type == pa.string()

    rows = pa.concat_tables(read_shard_rows(
        pa.table({"key": [p.shards[1].key], "path": [p.shards[1].path]}), filesystem=p.filesystem,
        schema=p.schema, batch_rows=2))
    assert rows.column("ticket_id").to_pylist() == ["0", "1", "2", "3", "4"]
    assert rows.column("_row").to_pylist() == [0, 1, 2, 3, 4]


def test_reader_rejects_bad_utf8_and_marks_a_shard_that_breaks_mid_read(tmp_path):
    good = pq.read_table(SAMPLES / "part-00000.parquet").slice(0, 6)
    bodies = pa.array([b.encode() for b in good.column("body").to_pylist()], pa.binary())
    bodies = pa.array([b"\xff\xfe broken" if i == 2 else v.as_py() for i, v in enumerate(bodies)], pa.binary())
    pq.write_table(good.set_column(good.schema.get_field_index("body"), "body", bodies.view(pa.string())),
                   tmp_path / "utf8.parquet")
    p = plan(tmp_path)
    rows = pa.concat_tables(read_shard_rows(pa.table({"key": ["k"], "path": [p.shards[0].path]}),
                                            filesystem=p.filesystem, schema=p.schema, batch_rows=4))
    codes, rejects = rows.column("reject_code").to_pylist(), rows.column("reject").to_pylist()
    assert codes[2] == "invalid_utf8" and rejects[2] == "column 'body' is not valid UTF-8"
    assert rows.column("body")[2].as_py() is None
    assert codes.count(None) == rejects.count(None) == 5

    # A shard whose footer reads but whose data pages do not: one marker row, `_row` -1, with the reason.
    pq.write_table(good, tmp_path / "broken.parquet", compression="zstd", row_group_size=3)
    data = bytearray((tmp_path / "broken.parquet").read_bytes())
    data[200:900] = b"\x00" * 700
    (tmp_path / "broken.parquet").write_bytes(bytes(data))
    p = plan(tmp_path / "broken.parquet")
    out = pa.concat_tables(read_shard_rows(pa.table({"key": ["b"], "path": [p.shards[0].path]}),
                                           filesystem=p.filesystem, schema=p.schema, batch_rows=10))
    marker = out.filter(pa.compute.equal(out.column("_row"), -1)).to_pylist()
    assert len(marker) == 1 and marker[0]["reject_code"] == "unreadable"
    assert marker[0]["reject"].startswith("failed after")


def test_duplicate_ids_by_policy(tmp_path):
    good = pq.read_table(SAMPLES / "part-00000.parquet").slice(0, 4)
    pq.write_table(good, tmp_path / "a.parquet")
    pq.write_table(good.slice(1, 2), tmp_path / "b.parquet")  # T-000002 and T-000003 again
    p = plan(tmp_path)
    a, b = (s.key for s in p.shards)
    kept = find_duplicates(p, "ticket_id", "keep_first", StorageOptions())
    assert set(kept) == {b} and set(kept[b]) == {0, 1}
    assert kept[b][0].startswith("ticket_id 'T-000002' was first seen at ") and "a.parquet row 1" in kept[b][0]
    every = find_duplicates(p, "ticket_id", "reject", StorageOptions())
    assert {k: set(v) for k, v in every.items()} == {a: {1, 2}, b: {0, 1}}
    assert every[a][1] == "ticket_id 'T-000002' appears 2 times"


@pytest.mark.cluster
def test_a_large_inputs_duplicate_pass_runs_on_the_cluster_and_finds_the_same_rows(ray_cluster, tmp_path,
                                                                                  monkeypatch):
    from pipelines.stages import read

    tickets = pq.read_table(SAMPLES / "part-00000.parquet")
    pq.write_table(tickets.slice(0, 40), tmp_path / "a.parquet")
    pq.write_table(pa.concat_tables([tickets.slice(40, 10), tickets.slice(5, 3)]), tmp_path / "b.parquet")
    ints = tickets.slice(60, 3).set_column(0, "ticket_id", pa.array([900, 901, 900], pa.int64()))
    pq.write_table(ints, tmp_path / "c.parquet")  # integer ids, read as text: 900 twice
    p = plan(tmp_path)
    assert len(p.shards) == 3
    for policy in ("keep_first", "reject"):
        here = find_duplicates(p, "ticket_id", policy, StorageOptions())
        monkeypatch.setattr(read, "DRIVER_DUPLICATE_PASS_MAX_ROWS", 10)
        assert read.duplicate_pass_on_cluster(p)
        there = find_duplicates(p, "ticket_id", policy, StorageOptions())
        monkeypatch.undo()
        assert there == here and sum(map(len, there.values())) == (4 if policy == "keep_first" else 8)


def test_missing_id_column_names_the_key(tmp_path):
    pq.write_table(pa.table({"subject": ["s"], "body": ["b"], "channel": ["c"]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match=r"column 'ticket_id' \(input\.id_column\) is missing"):
        plan(tmp_path, "output.passthrough=[]")
