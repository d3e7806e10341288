"""The committed sample shards are exactly what the generator script makes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from pipelines.samples import write_shards
from pipelines.samples.tickets import CATEGORIES, make_tickets

SAMPLES = Path(__file__).resolve().parents[2] / "data/samples/tickets"


def test_committed_shards_match_the_generator(tmp_path):
    committed = pq.read_table(sorted(SAMPLES.glob("*.parquet")))
    assert committed.equals(make_tickets())
    regenerated = pq.read_table(sorted(write_shards(make_tickets(), tmp_path)))
    assert regenerated.equals(committed)


def test_tickets_are_varied_and_unique():
    table = make_tickets(300)
    assert len(set(table.column("ticket_id").to_pylist())) == 300
    assert set(table.column("true_category").to_pylist()) == set(CATEGORIES)
    assert len(set(table.column("body").to_pylist())) > 250


def test_committed_review_and_invoice_shards_match_their_generators():
    from pipelines.samples import generators

    for name in ("reviews", "invoices"):
        make, rows = generators()[name]
        committed = pq.read_table(sorted((SAMPLES.parent / name).glob("*.parquet")))
        assert committed.equals(make(rows)), f"data/samples/{name} differs from its generator"
        truth = [c for c in committed.column_names if c.startswith("true_")]
        assert truth and committed.num_rows == rows
