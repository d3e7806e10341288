"""`tokenmill plan` and `tokenmill check` on an input with a corrupt, a truncated and two schema-drifted shards:
both exit 0 and name each bad shard with its reason (plan once crashed here with an AttributeError)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "conf/jobs/ticket_triage.yaml"
SAMPLES = REPO / "data/samples/tickets"


@pytest.fixture
def bad_input(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shards = sorted(SAMPLES.glob("*.parquet"))
    for good in shards[:2]:
        (folder / good.name).write_bytes(good.read_bytes())
    (folder / "part-corrupt.parquet").write_bytes(b"not parquet at all " * 20)
    data = shards[2].read_bytes()
    (folder / "part-truncated.parquet").write_bytes(data[: len(data) // 2])
    table = pq.read_table(shards[2])
    pq.write_table(table.drop_columns(["subject"]), folder / "part-missing-column.parquet")
    tier = table.schema.get_field_index("customer_tier")
    pq.write_table(table.set_column(tier, "customer_tier", pa.array([1.5] * table.num_rows)),
                   folder / "part-retyped.parquet")
    return folder, sum(pq.read_metadata(s).num_rows for s in shards[:2])


EXPECTED = {"part-corrupt.parquet": "unreadable: ", "part-truncated.parquet": "unreadable: ",
            "part-missing-column.parquet": "schema: column 'subject'",
            "part-retyped.parquet": "schema: column 'customer_tier'"}


def test_plan_lists_each_bad_shard_with_its_reason_and_exits_0(bad_input, tmp_path, capsys):
    folder, good_rows = bad_input
    out = tmp_path / "plan.json"
    code = main(["plan", str(JOB), "--set", f"input.path={folder}", "--set", f"output.path={tmp_path / 'out'}",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    plan = json.loads(out.read_text())
    assert plan["rows"] == good_rows and plan["shards"] == 2
    reasons = {Path(q["path"]).name: q["reason"] for q in plan["quarantined"]}
    assert set(reasons) == set(EXPECTED)
    for name, start in EXPECTED.items():
        assert reasons[name].startswith(start), reasons[name]
        assert f"quarantined    {folder / name}: {start}" in printed


def test_check_lists_each_bad_shard_with_its_reason_and_exits_0(bad_input, tmp_path, capsys):
    folder, good_rows = bad_input
    assert main(["check", str(JOB), "--set", f"input.path={folder}", "--set", f"output.path={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert f"{good_rows:,} records in 2 shard(s)" in printed
    for name, start in EXPECTED.items():
        assert f"quarantined (a run goes on without it): {folder / name}: {start}" in printed
